"""The Omniglot recipe's ablation ladder: each step's within-alphabet validation accuracy.

    python bench/recipes.py --out runs/bench                 # every step (about 80 minutes alone on 2 cores)
    python bench/recipes.py --steps episodes pretrain+elastic  # some of them

Each step trains a Matching Network from seed 0 (``--seed``) on ``images_background_small1`` with
``engine.train.recipe("omniglot")`` at 28x28 (``OMNIGLOT_28``, the side the ladder was built at)
with 64 filters in every block (as the ladder was built) and the step's overrides (3,000 episodes after any
supervised stage), then measures, on the validation alphabets, within-alphabet 20-way
1-shot accuracy over 1,000 episodes (95% CI) and the error on ``one-shot-sample``, each
twice: every image seen once, and as the mean of the recipe's test-time views (training
is the same either way). Writes recipes.json and recipes.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine.runtime import prepare

EPISODES = 3000
# name: (what it adds, overrides of the recipe); "pretrain+elastic" is the recipe itself (its test-time
# views are scored for every step, since they change no training)
STEPS = {
    "episodes+fce": ("episodes only, FCE", {"pretrain_epochs": 0, "elastic": 0.0, "fce": True}),
    "episodes": ("episodes only", {"pretrain_epochs": 0, "elastic": 0.0}),
    "pretrain+fce": ("+ 20 supervised epochs first, FCE", {"elastic": 0.0, "fce": True}),
    "pretrain": ("+ 20 supervised epochs first", {"elastic": 0.0}),
    "pretrain+elastic": ("+ elastic strokes (1.5 px): the 28x28 recipe", {}),
    "pretrain+elastic+fce": ("the 28x28 recipe, FCE", {"fce": True}),
    "pretrain+elastic+thickness": ("+ thicker or thinner strokes (0.5): dropped", {"thickness": 0.5}),
    "pretrain+elastic+wide": ("+ a wider embedding (128 filters a block)", {"width": 128}),
    "pretrain-only": ("20 supervised epochs, no episodes", {"elastic": 0.0, "episodes": 0}),
}


def run_step(name: str, data, out: Path, episodes: int = EPISODES, pretrain_epochs: int | None = None,
             eval_episodes: int = 1000, seed: int = 0) -> dict:
    from engine.train import OMNIGLOT_28, recipe, train

    what, overrides = STEPS[name]
    if pretrain_epochs is not None and overrides.get("pretrain_epochs", 1):  # a shorter stage (smoke runs)
        overrides = {**overrides, "pretrain_epochs": pretrain_epochs}
    episodes = overrides.get("episodes", episodes)
    cfg = recipe("omniglot", **{**OMNIGLOT_28, "width": 64, "episodes": episodes, "val_every": max(episodes // 3, 1),
                                "val_episodes": min(100, eval_episodes), "seed": seed,
                                "data": None if data is None else str(data), **overrides})
    t0 = time.perf_counter()
    summary = train(cfg, out / name, progress=True)
    train_s = time.perf_counter() - t0
    row = {"step": name, "what": what, "fce": cfg.fce, "pretrain_epochs": cfg.pretrain_epochs,
           "elastic": cfg.elastic, "thickness": cfg.thickness, "width": cfg.width, "episodes": summary["episodes"],
           "train_s": train_s, "views": cfg.views, "seed": cfg.seed}
    for suffix, views in (("", 1), ("_views", cfg.views)):
        row.update(score(out / name, cfg, views, data, eval_episodes, suffix))
    return row


def score(checkpoint: Path, cfg, views: int, data, eval_episodes: int, suffix: str) -> dict:
    """Within-alphabet validation accuracy and the run01 error of a checkpoint seen through ``views`` views."""
    import torch

    from engine.data.omniglot import load_oneshot_runs, omniglot_dir
    from engine.train import eval_oneshot, evaluate_episodes, load_checkpoint, load_sets

    torch.use_deterministic_algorithms(True, warn_only=True)
    model = load_checkpoint(checkpoint, views=views)
    _, _, val_x, val_groups = load_sets(cfg)
    val = evaluate_episodes(model, val_x, val_groups, n_way=20, k_shot=1, episodes=eval_episodes, within_group=1.0,
                            seed=7)
    oneshot = eval_oneshot(model, load_oneshot_runs(omniglot_dir(data) / "one-shot-sample", size=cfg.image_size))
    return {f"val_within_20way{suffix}": val["accuracy"], f"val_ci95{suffix}": val["ci95"],
            f"run01_error{suffix}": oneshot["error_rate"]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    ap.add_argument("--data", type=Path, default=None, help="datasets folder (default: $ENGINE_DATA or ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--episodes", type=int, default=EPISODES, help="episodes after the supervised stage")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="another length of the supervised stage")
    ap.add_argument("--eval-episodes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="training seed (evaluation episodes stay the same)")
    args = ap.parse_args(argv)
    prepare()  # engine.runtime: before torch loads
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.steps:
        rows.append(run_step(name, args.data, args.out / "recipes" / f"seed{args.seed}", args.episodes,
                             args.pretrain_epochs, args.eval_episodes, args.seed))
        r = rows[-1]
        print(f"{name:22s} {100 * r['val_within_20way']:.2f}% ± {100 * r['val_ci95']:.2f} "
              f"({r['views']} views: {100 * r['val_within_20way_views']:.2f}%), run01 error "
              f"{100 * r['run01_error']:.0f}% ({100 * r['run01_error_views']:.0f}%), {r['train_s']:.0f} s", flush=True)
    (args.out / "recipes.json").write_text(
        json.dumps({"episodes": args.episodes, "seed": args.seed, "results": rows}, indent=2))
    views = rows[0]["views"] if rows else 1
    lines = [f"| step | FCE | within-alphabet 20-way 1-shot (validation, {args.eval_episodes:,} episodes) | the same, "
             f"{views} test-time views | run01 error (1 / {views} views) | training s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['what']} | {'yes' if r['fce'] else 'no'} | {100 * r['val_within_20way']:.2f}% ± "
                     f"{100 * r['val_ci95']:.2f} | {100 * r['val_within_20way_views']:.2f}% ± "
                     f"{100 * r['val_ci95_views']:.2f} | {100 * r['run01_error']:.0f}% / "
                     f"{100 * r['run01_error_views']:.0f}% | {r['train_s']:.0f} |")
    (args.out / "recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
