"""The Omniglot learner measured as the field does: both minimal background sets, several seeds.

    python bench/learner.py --out runs/bench                          # the recipe: small1 and small2, seeds 0 1 2
    python bench/learner.py --levers size28 wide --seeds 0 1          # levers side by side, each over the seeds
    python bench/learner.py --levers long --width 64 --seeds 0 1      # a lever with 64 filters in every block
    python bench/learner.py --runs path/to/all_runs.zip               # also the official 20 runs, where a user has them
    python bench/learner.py --reuse --views 16 --out runs/bench       # the models trained there, through 16 views
    python bench/learner.py --levers recipe distill --seeds 0 1       # students taught by the recipe's seeds 0 1

For each lever, background set (``images_background_small1`` / ``_small2``) and seed, a
Matching Network is trained with ``engine.train.recipe("omniglot")`` and the lever's
overrides (``--episodes`` episodes after the supervised stage; validated on the alphabets
of the other minimal set that the background lacks). Each model is then scored through its
test-time views on:

- within-alphabet 20-way 1-shot validation episodes (``--eval-episodes``, the same
  episodes for every model), accuracy with its 95% CI over episodes;
- runs in the official layout built from the validation alphabets (``--eval-episodes`` of
  them: 20 characters of one alphabet, one drawing of each in memory, another of each to
  classify), per-query error with its 95% CI;
- the per-query error on the official runs layout: ``one-shot-sample`` (``run01``, 20
  items, so steps of 5 points) and, with ``--runs``, the runs given (the full task is
  the 20 runs of ``all_runs.zip``).

With ``--reuse`` a model already trained to the end in ``--out`` with the same config is
scored again rather than trained anew (its ``train_s`` is then null), into
learner-reuse.json, .md and .png; a finished run of another config in the model's folder, or
a damaged one, is refused, not trained over, and a run stopped before its end is trained
afresh. With it,
``--views N`` scores every model through N test-time views instead of the recipe's (into
learner-reuse-viewsN.*).

Each error is also given transductively, in parentheses and apart: the run's items matched to
its classes one to one (``eval-oneshot --assign``).

The ``distill`` and ``longdistill`` levers train students taught by another lever's models
(``recipe``'s, ``long``'s) of the same set, the seeds of ``--teacher-seeds`` as one ensemble,
from ``--teachers`` (a learner folder; by default this run's, where listing that lever first
trains them); teachers not trained to their end with the run's settings are refused before
anything trains.

``--width`` and ``--pretrain-epochs`` set an option for every lever; the rows and folders
of such models carry it in their name (``recipe-width64``), apart from the lever's own.

A lever is judged on the mean over seeds and sets, never on one run: the table gives each
(lever, set)'s mean and its spread (max - min) over seeds. With two seeds or more, every
group of two or more of the seeds' models is also scored as one ensemble
(``engine.nn.ensemble``: the mean of their logits), a lever that costs no training beyond
the seeds'; a group size's mean is over its groups. Writes learner.json,
learner.md and learner.png (validation accuracy per lever and set, one point a seed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from engine.runtime import prepare

EPISODES = 3000  # every lever is compared at this length; engine train runs 6,000 (the long lever)
# engine.train.OMNIGLOT_28 (without torch) with 64 filters in every block, as the 28x28 levers were measured
AT_28 = {"image_size": 28, "shift": 2.0, "elastic": 1.5, "width": 64}
# name: (what it changes, overrides of the recipe, engine.train.recipe("omniglot"): 40x40, filters 64, 64, 128,
# 256, pool flat). The 40x40 rows measured before the recipe widened its last two blocks: --width 64
LEVERS = {
    "recipe": ("the recipe (40x40, filters 64, 64, 128, 256, the last map kept whole)", {}),
    # the recipe before its last two blocks were widened: 64 filters in every block (256 numbers a slot)
    "narrow": ("the recipe with 64 filters in every block", {"width": 64}),
    # the recipe's filters with the last 2x2 map averaged: 256 numbers a slot, as many as narrow's, not 1,024
    "widemean": ("the recipe with the last map averaged (256 numbers a slot)", {"pool": "mean"}),
    # the recipe at 28x28 (shifts 2 px, elastic 1.5 px; the last map is 1x1) with 64 filters a block
    "size28": ("the recipe at 28x28 (shifts 2 px, elastic 1.5 px), 64 filters a block", AT_28),
    # the recipe's filters (64, 64, 128, 256) at 28x28, where the last map is one position (256 numbers):
    # engine.train.OMNIGLOT_28, the demo's model
    "size28late": ("the recipe at 28x28 with filters 64, 64, 128, 256", {**AT_28, "width": [64, 64, 128, 256]}),
    # wide, way60, erase, decay, mixup and fce were measured against the recipe at 28x28 and keep its side
    "wide": ("a wider embedding (128 filters a block)", {**AT_28, "width": 128}),
    # no alphabet holds 60 characters (with rotations), so 60-way episodes are drawn across alphabets
    "way60": ("60-way training episodes, across alphabets", {**AT_28, "n_way": 60, "within_alphabet": 0.0}),
    # 40x40 with the last 2x2 map averaged (64 numbers), as measured against size28 before the
    # recipe kept the map whole (shifts and elastic grown with the image)
    "size40": ("40x40 images (shifts 3 px, elastic 2 px), the last map averaged",
               {"image_size": 40, "shift": 3.0, "elastic": 2.0, "pool": "mean", "width": 64}),
    # a third of the episodes (1,000 by default), the supervised stage unchanged: a shorter training at 40x40
    "size40short": ("40x40 images, the last map averaged, a third of the episodes",
                    {"image_size": 40, "shift": 3.0, "elastic": 2.0, "pool": "mean", "width": 64,
                     "episodes_share": 1 / 3}),
    "short": ("the recipe with a third of the episodes", {"episodes_share": 1 / 3}),
    "long": ("the recipe with twice the episodes", {"episodes_share": 2}),
    "longer": ("the recipe with four times the episodes", {"episodes_share": 4}),
    # 56x56: shifts and elastic grown with the image as from 28x28 to 40x40 (about 0.075 and 0.05 of the side)
    "size56": ("56x56 images (shifts 4 px, elastic 2.8 px), the last map averaged",
               {"image_size": 56, "shift": 4.0, "elastic": 2.8, "pool": "mean", "width": 64}),
    # a square of 0.35 of the side (10 px at 28x28) blanked in every training image: part of the strokes left out
    "erase": ("a square blanked in each training image (cutout, side 0.35)", {**AT_28, "erase": 0.35}),
    "decay": ("weight decay 0.05 (AdamW) on the weight matrices and filters", {**AT_28, "weight_decay": 0.05}),
    "mixup": ("mixup in the supervised stage (Beta(1, 1): shares uniform)", {**AT_28, "mixup": 1.0}),
    "fce": ("Full Context Embeddings", {**AT_28, "fce": True}),
    # the validation and the official runs draw every episode within one alphabet; the recipe trains half so.
    # Alphabets of fewer than 20 characters (small2's Tagalog) then appear in no training episode
    "within": ("every training episode within one alphabet", {"within_alphabet": 1.0}),
    # the recipe's affine jitter (shifts 3 px, turns 10 degrees, zoom 10%) half as large again; elastic kept at 2 px
    "jitter": ("stronger affine jitter (shifts 4 px, turns 15 degrees, zoom 15%)",
               {"shift": 4.0, "rotate": 15.0, "scale": 0.15}),
    # one model taught by the recipe's seeds as one ensemble (--teachers, --teacher-seeds): half of each
    # stage's loss is the KL to the ensemble's answer
    "distill": ("the recipe distilled from the recipe's models as one ensemble (half the loss)",
                {"distill": 0.5, "teachers_of": "recipe"}),
    "longdistill": ("twice the episodes, distilled from the long lever's models as one ensemble (half the loss)",
                    {"distill": 0.5, "teachers_of": "long", "episodes_share": 2}),
}


def lever_config(lever: str, background: str, seed: int, data, episodes: int, eval_episodes: int,
                 given: dict | None):
    """The lever's config; ``given``: options set on the command line for every lever, over its own
    (``--pretrain-epochs``, ``--width``; None: not given)."""
    from engine.train import recipe

    _, overrides = LEVERS[lever]
    given = dict(given or {})
    teachers_dir, teacher_seeds = given.pop("teachers", None), given.pop("teacher_seeds", None) or [0, 1]
    overrides = {**overrides, **{k: v for k, v in given.items() if v is not None}}
    teachers_of = overrides.pop("teachers_of", None)
    if teachers_of is not None:  # the teachers: that lever's models of this set (named with the options given
        # for every lever, as its folders are), one a teacher seed
        if teachers_dir is None:
            raise SystemExit(f"{lever} distils from {teachers_of}'s models: give --teachers, the learner folder "
                             f"that holds them ({teachers_of}/<set>/seed<N>)")
        folder = Path(teachers_dir) / named(teachers_of, given)[0] / background
        overrides["teachers"] = [str(folder / f"seed{s}") for s in teacher_seeds]
    share = overrides.pop("episodes_share", 1.0)  # a lever may train a share of the episodes
    if episodes > 0 and share != 1.0:
        episodes = max(1, round(episodes * share))
    # three validations for every length (the best of them is the model scored)
    return recipe("omniglot", **{"val_every": max(1, episodes // 3),
                                 "val_episodes": min(100, eval_episodes), "seed": seed, "background": background,
                                 "data": None if data is None else str(data), **overrides, "episodes": episodes})


def named(lever: str, given: dict | None) -> tuple[str, str]:
    """A lever's name (in rows and folders) and description, with the options given for every
    lever: a model trained with ``--width 64`` is not the lever's own, so it is named, and kept,
    apart from it."""
    name, what = lever, LEVERS[lever][0]
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if "teachers_of" in LEVERS[lever][1]:  # which of the teachers' seeds teach (the same seed: the same start)
        seeds = list(given.get("teacher_seeds") or [0, 1])
        if seeds != [0, 1]:
            name = f"{name}-t{'-'.join(map(str, seeds))}"
        what = f"{what}; teachers seeds {', '.join(map(str, seeds))}"
    if "pretrain_epochs" in given:
        name, what = f"{name}-pre{given['pretrain_epochs']}", f"{what}; {given['pretrain_epochs']} supervised epochs"
    if "width" in given:
        counts = given["width"] if isinstance(given["width"], list) else [given["width"]]
        name = f"{name}-width{'-'.join(map(str, counts))}"
        what = f"{what}; filters {', '.join(map(str, counts))}{' a block' if len(counts) == 1 else ''}"
    return name, what


def score(model, cfg, data, eval_episodes: int, runs: Path | None) -> dict:
    """Within-alphabet validation accuracy and the official runs' error of a model."""
    import torch

    from engine.data.omniglot import load_oneshot_runs, omniglot_dir
    from engine.train import episode_features, eval_oneshot, evaluate_episodes, load_sets

    torch.use_deterministic_algorithms(True, warn_only=True)
    _, _, val_x, val_groups = load_sets(cfg)
    features = episode_features(model, val_x)
    val = evaluate_episodes(model, val_x, val_groups, n_way=20, k_shot=1, episodes=eval_episodes, within_group=1.0,
                            seed=7, features=features)
    # runs in the official layout built from the validation alphabets: 20 characters of one
    # alphabet, one drawing of each in memory and another of each to classify
    layout = evaluate_episodes(model, val_x, val_groups, n_way=20, k_shot=1, n_query=1, episodes=eval_episodes,
                               within_group=1.0, seed=8, assign=True, features=features)
    sample = load_oneshot_runs(omniglot_dir(data) / "one-shot-sample", size=cfg.image_size)
    run01 = eval_oneshot(model, sample, assign=True)
    row = {"val_within_20way": val["accuracy"], "val_ci95": val["ci95"],
           "val_runs_error": 1 - layout["accuracy"], "val_runs_ci95": layout["ci95"],
           "val_runs_assigned_error": 1 - layout["assigned_accuracy"],
           "val_runs_assigned_ci95": layout["assigned_ci95"],
           "run01_error": run01["error_rate"], "run01_assigned_error": run01["assigned"]["error_rate"]}
    if runs is not None:
        official = eval_oneshot(model, load_oneshot_runs(runs, size=cfg.image_size), assign=True)
        row["runs_error"], row["runs_assigned_error"] = official["error_rate"], official["assigned"]["error_rate"]
    return row


def trained(folder: Path, cfg) -> bool:
    """Whether ``folder`` holds a run of ``cfg`` trained to its last episode. A run trained
    to its end with another config is refused (scored as this one, it would be mislabelled;
    trained over, it would be lost), naming what differs; so is a damaged one. The saved
    config is read as a resume reads it (``engine.train.resume_config``: an option the run
    predates at its default; the model section, which the run fills in, left out)."""
    from dataclasses import asdict

    from engine.train import resume_config

    if not (folder / "config.json").is_file() or not (folder / "state.json").is_file():
        return False  # nothing there, or a run stopped before its first checkpoint: trained afresh
    saved = asdict(resume_config(folder))  # CorruptFileError for a damaged config.json
    try:
        state = json.loads((folder / "state.json").read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise SystemExit(f"{folder / 'state.json'} is damaged ({exc}): not scored, not trained over") from None
    if not isinstance(state, dict) or state.get("episode") != saved["episodes"] or not (folder / "best.pt").is_file():
        return False  # stopped before its end: trained afresh
    wanted = asdict(cfg)
    for doc in (saved, wanted):  # a teacher's folder as a run saves it (absolute); their digests the run fills in
        doc["teachers"] = [str(Path(t).absolute()) for t in doc["teachers"]]
    differ = [f"{key}: {saved[key]!r} there, {wanted[key]!r} here" for key in wanted
              if key not in ("model", "teacher_digests") and saved[key] != wanted[key]]
    if differ:
        raise SystemExit(f"{folder} holds a run trained to its end with another config ({'; '.join(differ)}): "
                         f"give the options it was trained with, or another --out")
    return True


def run_one(lever: str, background: str, seed: int, data, out: Path, episodes: int, eval_episodes: int,
            given: dict, runs: Path | None, *, reuse: bool = False, views: int | None = None) -> dict:
    """Train one model (or, with ``reuse``, take the one trained there) and score it (see the module)."""
    from engine.train import load_checkpoint, train

    cfg = lever_config(lever, background, seed, data, episodes, eval_episodes, given)
    name, what = named(lever, given)
    folder = out / name / background / f"seed{seed}"
    train_s = None
    if reuse and trained(folder, cfg):
        print(f"{folder}: trained to episode {cfg.episodes} with this config, scored again", flush=True)
    else:
        if reuse:
            print(f"{folder}: no run of this config trained to its end, trained afresh", flush=True)
        t0 = time.perf_counter()
        train(cfg, folder, progress=True)
        train_s = time.perf_counter() - t0
    model = load_checkpoint(folder, views=views)  # the best validated state, through the test-time views
    return {"lever": name, "what": what, "background": background, "seed": seed, "episodes": cfg.episodes,
            "views": model.views, "train_s": train_s, **score(model, cfg, data, eval_episodes, runs)}


def run_ensemble(lever: str, background: str, seeds: list[int], data, out: Path, episodes: int,
                 eval_episodes: int, given: dict, runs: Path | None, *,
                 views: int | None = None) -> dict:
    """The seeds' models of a (lever, set) as one ensemble (no training)."""
    from engine.nn import ensemble
    from engine.train import load_checkpoint

    cfg = lever_config(lever, background, seeds[0], data, episodes, eval_episodes, given)
    name, what = named(lever, given)
    members = [load_checkpoint(out / name / background / f"seed{s}", views=views) for s in seeds]
    return {"lever": f"{name}+ensemble{len(seeds)}", "what": f"{what}, {len(seeds)} seeds as one ensemble",
            "background": background, "seed": -1, "members": list(seeds), "episodes": cfg.episodes,
            "views": members[0].views, "train_s": 0.0, **score(ensemble(members), cfg, data, eval_episodes, runs)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per (lever, background) and per lever over both sets: mean and spread (max - min) over seeds."""
    out = []
    keys = sorted({(r["lever"], r["background"]) for r in rows}) + sorted({(r["lever"], "both") for r in rows})
    for lever, background in keys:
        mine = [r for r in rows if r["lever"] == lever and background in (r["background"], "both")]
        acc = np.array([r["val_within_20way"] for r in mine])
        row = {"lever": lever, "background": background, "models": len(mine), "val_mean": float(acc.mean()),
               "val_spread": float(acc.max() - acc.min())}
        for key in ("val_runs_error", "val_runs_assigned_error", "run01_error", "run01_assigned_error", "runs_error",
                    "runs_assigned_error"):
            if all(key in r for r in mine):
                row[f"{key}_mean"] = float(np.mean([r[key] for r in mine]))
        out.append(row)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["lever"], r["background"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups)), 3.8))  # the title's width at least
    for i, (lever, background) in enumerate(groups):
        acc = [100 * r["val_within_20way"] for r in rows if (r["lever"], r["background"]) == (lever, background)]
        ax.scatter([i] * len(acc), acc, color="tab:blue", zorder=3)
        ax.hlines(np.mean(acc), i - 0.25, i + 0.25, color="tab:red", zorder=2)
    ax.set_xticks(range(len(groups)),
                  [f"{lever.replace('+', chr(10) + '+')}\n{background}" for lever, background in groups])
    ax.set_ylabel("within-alphabet 20-way 1-shot (%)")
    ax.set_title("one point a seed (or an ensemble), the mean in red", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _say(r: dict) -> None:
    who = f"ensemble of seeds {r['members']}" if r["seed"] < 0 else f"seed {r['seed']}"
    print(f"{r['lever']:8s} {r['background']} {who}: {100 * r['val_within_20way']:.2f}% ± "
          f"{100 * r['val_ci95']:.2f}; official layout on validation alphabets: error {100 * r['val_runs_error']:.2f}%"
          f" (assigned {100 * r['val_runs_assigned_error']:.2f}%); run01 error {100 * r['run01_error']:.0f}%"
          f" (assigned {100 * r['run01_assigned_error']:.0f}%)"
          + (f", runs error {100 * r['runs_error']:.2f}% (assigned {100 * r['runs_assigned_error']:.2f}%)"
             if "runs_error" in r else "")
          + (f", {r['train_s']:.0f} s" if r["train_s"] is not None else ", trained before"), flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levers", nargs="+", choices=list(LEVERS), default=["recipe"])
    ap.add_argument("--backgrounds", nargs="+", choices=["small1", "small2"], default=["small1", "small2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=None, help="datasets folder (default: $ENGINE_DATA or ../shared/data)")
    ap.add_argument("--runs", type=Path, default=None,
                    help="official runs to score too (a folder of runNN or all_runs.zip)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--episodes", type=int, default=EPISODES, help="episodes after the supervised stage")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="another length of the supervised stage")
    ap.add_argument("--width", type=int, nargs="+", default=None,
                    help="filters of every lever's backbone: one count, or four, one a block (64 64 128 256)")
    ap.add_argument("--teachers", type=Path, default=None,
                    help="distill, longdistill: the learner folder holding the teachers (<lever>/<set>/seed<N>; "
                         "default: --out's learner folder, where --levers recipe distill trains them first)")
    ap.add_argument("--teacher-seeds", type=int, nargs="+", default=[0, 1],
                    help="distill, longdistill: the seeds of the teachers' models, one ensemble (default: 0 1)")
    ap.add_argument("--eval-episodes", type=int, default=1000)
    ap.add_argument("--reuse", action="store_true",
                    help="score the models already trained to their end in --out with the same config, not train anew")
    ap.add_argument("--views", type=int, default=None,
                    help="with --reuse, test-time views to score every model through (default: the recipe's)")
    args = ap.parse_args(argv)
    if args.views is not None and (args.views < 1 or not args.reuse):
        ap.error(f"--views rescores trained models: give --reuse, and at least 1 view (got {args.views})")
    if args.width is not None and len(args.width) not in (1, 4):
        ap.error(f"--width is one count of filters or four, one a block; got {len(args.width)}")
    given = {"pretrain_epochs": args.pretrain_epochs,
             "width": None if args.width is None else args.width[0] if len(args.width) == 1 else args.width,
             "teachers": str((args.teachers or args.out / "learner").absolute()), "teacher_seeds": args.teacher_seeds}
    prepare()  # engine.runtime: before torch loads
    from engine.errors import InvalidValueError
    from engine.train.config import check_stage

    try:  # every option's value checked before a folder is made or a model trained
        for lever in args.levers:
            check_stage(lever_config(lever, args.backgrounds[0], args.seeds[0], args.data, args.episodes,
                                     args.eval_episodes, given))
    except InvalidValueError as exc:
        ap.error(str(exc))
    for index, lever in enumerate(args.levers):  # a lever's teachers: trained to their end, or trained first here
        teachers_of = LEVERS[lever][1].get("teachers_of")
        trained_here = (teachers_of in args.levers[:index] and set(args.teacher_seeds) <= set(args.seeds)
                        and Path(given["teachers"]) == (args.out / "learner").absolute())
        if teachers_of is None or trained_here:
            continue
        for background, seed in itertools.product(args.backgrounds, args.teacher_seeds):
            folder = Path(given["teachers"]) / named(teachers_of, given)[0] / background / f"seed{seed}"
            wanted = lever_config(teachers_of, background, seed, args.data, args.episodes, args.eval_episodes, given)
            if not trained(folder, wanted):
                ap.error(f"{lever} distils from {folder}, which holds no {teachers_of} model trained to its end: "
                         f"train it first (--levers {teachers_of} {lever}), or give --teachers")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reuse:  # a finished run of another config is refused before anything trains, not hours in
        for lever, background, seed in itertools.product(args.levers, args.backgrounds, args.seeds):
            trained(args.out / "learner" / named(lever, given)[0] / background / f"seed{seed}",
                    lever_config(lever, background, seed, args.data, args.episodes, args.eval_episodes, given))
    rows = []
    for lever in args.levers:
        for background in args.backgrounds:
            for seed in args.seeds:
                r = run_one(lever, background, seed, args.data, args.out / "learner", args.episodes,
                            args.eval_episodes, given, args.runs, reuse=args.reuse, views=args.views)
                rows.append(r)
                _say(r)
            for size in range(2, len(args.seeds) + 1):  # every ensemble of the seeds' models
                for members in itertools.combinations(args.seeds, size):
                    rows.append(run_ensemble(lever, background, list(members), args.data, args.out / "learner",
                                             args.episodes, args.eval_episodes, given, args.runs,
                                             views=args.views))
                    _say(rows[-1])
    summary = summarise(rows)
    doc = {"episodes": args.episodes, "eval_episodes": args.eval_episodes, "views": sorted({r["views"] for r in rows}),
           "results": rows, "summary": summary}
    # a rescoring writes files of its own: the training run's table (and its times) stays
    name = "learner" + ("-reuse" if args.reuse else "") + (f"-views{args.views}" if args.views else "")
    (args.out / f"{name}.json").write_text(json.dumps(doc, indent=2))
    lines = ["| lever | background | models | within-alphabet 20-way 1-shot, mean (spread over seeds) | "
             "error on runs built from the validation alphabets (assigned) | run01 error (assigned) |"
             + (" official runs error (assigned) |" if args.runs else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if args.runs else "")]
    whats = {r["lever"]: r["what"] for r in rows}
    for s in summary:
        what = whats[s["lever"]]
        lines.append(f"| {what} | {s['background']} | {s['models']} | {100 * s['val_mean']:.2f}% "
                     f"({100 * s['val_spread']:.2f}) | {100 * s['val_runs_error_mean']:.2f}% "
                     f"({100 * s['val_runs_assigned_error_mean']:.2f}%) | {100 * s['run01_error_mean']:.1f}% "
                     f"({100 * s['run01_assigned_error_mean']:.1f}%) |"
                     + (f" {100 * s['runs_error_mean']:.2f}% ({100 * s['runs_assigned_error_mean']:.2f}%) |"
                        if "runs_error_mean" in s else ""))
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / f"{name}.png")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
