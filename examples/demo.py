"""``make demo`` (``python examples/demo.py``): Matching Networks meta-trained on Omniglot,
and memories of Fashion-MNIST. A script that uses the library, not part of it.

1. Omniglot: meta-train on the minimal split small1 (a short schedule of the
   default recipe at 28x28, ``OMNIGLOT_28``), then evaluate on the official one-shot run(s) and on
   within-alphabet 20-way episodes of the validation alphabets.
2. Fashion-MNIST: the 60k training images become memory slots, the 10k test
   images are classified by exact softmax attention over their top-k plus the
   estimated rest of the memory (the default ``probs="full"``); once with
   64-d PCA pixels (``faiss.PCAMatrix``, the learning-free baseline), once with
   embeddings of a Matching Network trained on Fashion-MNIST (the recipe with 10
   supervised epochs instead of 20, to fit the demo's 15 minutes).
A Markdown report with PNG plots goes to ``runs/demo/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine import Memory
from engine.data import as_input, load_fashion_mnist, pca_embed


def pca_memory_report(data=None, *, k: int = 64, dim: int = 64, temperature: float | str = "auto",
                      index: str = "Flat", limit: int | None = None, batch: int = 500,
                      out: str | Path | None = "runs/demo", progress: bool = True, check: int = 1000) -> dict:
    """Fashion-MNIST as a memory of 64-d PCA pixels: build it, answer the test set, report.

    Args:
        data: the data directory (default: ``$ENGINE_DATA`` or ``../shared/data``).
        k: slots per query.
        dim: PCA dimensions.
        temperature: attention temperature ("auto": the memory chooses it on its own slots).
        index: FAISS index spec.
        limit: use only the first ``limit`` train and test images (smoke runs).
        batch: queries per batch.
        out: folder for ``pca.json`` (None: do not write).
        progress: show progress bars.
        check: how many test queries to compare with dense attention over every slot.

    Returns:
        The report: accuracy, median tail bound, queries per second, bytes used, ...
    """
    xtr, ytr = load_fashion_mnist(data, "train")
    xte, yte = load_fashion_mnist(data, "test")
    if limit:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    t0 = time.perf_counter()
    ztr, zte = pca_embed(xtr, xte, dim)
    embed_s = time.perf_counter() - t0

    mem = Memory(dim, index=index, temperature=temperature)
    t0 = time.perf_counter()
    for lo in tqdm(range(0, len(ztr), 10_000), desc="writing slots", unit="chunk", disable=not progress):
        mem.add(ztr[lo : lo + 10_000], ytr[lo : lo + 10_000])
    add_s = time.perf_counter() - t0

    predicted, bounds = [], []
    t0 = time.perf_counter()
    with tqdm(total=len(zte), desc="querying", unit="q", disable=not progress) as bar:
        for lo in range(0, len(zte), batch):
            res = mem.query(zte[lo : lo + batch], k=k)
            predicted.append(res.labels)
            bounds.append(res.tail_bound)
            bar.update(len(res))
    query_s = time.perf_counter() - t0
    predicted, bounds = np.concatenate(predicted), np.concatenate(bounds)
    temperature = mem.temperature  # the one chosen, with "auto"
    agreement, tv = _against_full_attention(mem, ztr, ytr, zte[:check], k, temperature, "top-k")
    agreement_full, tv_full = _against_full_attention(mem, ztr, ytr, zte[:check], k, temperature, "full")
    stats = mem.stats()
    report = {
        "dataset": "fashion-mnist",
        "embedding": f"pca{dim}",
        "slots": stats.slots,
        "queries": int(len(zte)),
        "k": k,
        "temperature": temperature,
        "index": stats.index,
        "accuracy": float((predicted == yte).mean()),
        "tail_bound_median": float(np.median(bounds)),
        "tail_bound_p99": float(np.quantile(bounds, 0.99)),
        "full_attention_checked": int(min(check, len(zte))),
        "full_attention_argmax_agreement": agreement,
        "full_attention_tv_median": float(np.median(tv)),
        "full_attention_tv_max": float(np.max(tv)),
        "estimated_tail_argmax_agreement": agreement_full,
        "estimated_tail_tv_median": float(np.median(tv_full)),
        "estimated_tail_tv_mean": float(np.mean(tv_full)),
        "full_attention_tv_mean": float(np.mean(tv)),
        "exact_bound": bool(stats.exact),
        "queries_per_s": float(len(zte) / query_s),
        "add_slots_per_s": float(stats.slots / add_s),
        "embed_s": embed_s,
        "bytes_total": stats.bytes_total,
        "bytes_per_slot": stats.bytes_total / stats.slots,
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "pca.json").write_text(json.dumps(report, indent=2))
    return report


def _against_full_attention(mem: Memory, z: np.ndarray, y: np.ndarray, q: np.ndarray, k: int, temperature: float,
                            probs: str, chunk: int = 250) -> tuple[float, np.ndarray]:
    """The memory's answers (``probs`` "top-k" or "full") against dense softmax attention over
    all slots (float64): argmax agreement and total variation."""
    zn = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float64)
    classes = np.unique(y)
    agree, tv = [], []
    for lo in range(0, len(q), chunk):
        qc = q[lo : lo + chunk].astype(np.float64)
        logits = (qc / np.linalg.norm(qc, axis=1, keepdims=True)) @ zn.T / temperature
        a = np.exp(logits - logits.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
        full = np.stack([a[:, y == c].sum(axis=1) for c in classes], axis=1)
        res = mem.query(q[lo : lo + chunk], k=k, probs=probs)
        top = np.zeros_like(full)
        top[:, np.searchsorted(classes, res.classes)] = res.probs
        agree.append(full.argmax(axis=1) == top.argmax(axis=1))
        tv.append(0.5 * np.abs(full - top).sum(axis=1))
    return float(np.concatenate(agree).mean()), np.concatenate(tv)


def run_demo(data=None, *, out: str | Path = "runs/demo", quick: bool = False, fce: bool = False,
             omniglot_episodes: int = 3000, omniglot_budget_s: float | None = None, fashion_epochs: int = 10,
             fashion_episodes: int = 0, fashion_budget_s: float | None = None, progress: bool = True) -> dict:
    """The whole demo: Omniglot meta-training and evaluation, Fashion-MNIST memories, a report.

    Args:
        data: the data directory.
        out: where the report, plots and checkpoints go.
        quick: a few episodes and small sets (a smoke run for the tests).
        fce: train the Omniglot model with Full Context Embeddings (off: after the supervised
            stage, FCE scored lower on the validation alphabets: docs/experiments.md).
        omniglot_episodes, omniglot_budget_s: Omniglot episodes after the recipe's supervised
            stage, and an optional time cap (off: a capped run depends on how busy the machine
            is).
        fashion_epochs: Fashion-MNIST's supervised epochs. The recipe's 20 take about 11
            minutes alone; the demo's 15-minute budget holds 10 (docs/matching-networks.md).
        fashion_episodes, fashion_budget_s: Fashion-MNIST episodes after its supervised stage
            (none: 300 of them lowered the memory's accuracy from 0.918 to 0.912), and their
            optional time cap.
        progress: progress bars.

    Returns:
        Every figure of the report, as a dict (also written to ``demo.json``).
    """
    import torch

    from engine.data.omniglot import load_oneshot_runs, omniglot_dir
    from engine.train import (
        OMNIGLOT_28,
        episode_features,
        eval_oneshot,
        evaluate_episodes,
        load_checkpoint,
        load_sets,
        recipe,
        train,
    )

    torch.use_deterministic_algorithms(True, warn_only=True)  # evaluation too (see engine.train.train)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pretrain = {}
    if quick:  # no supervised stage: a smoke run of the pipeline, not of the recipe
        omniglot_episodes, fashion_episodes, pretrain = 4, 4, {"pretrain_epochs": 0}
    limit = 2000 if quick else None
    report: dict = {"quick": quick}

    report["pca"] = pca_memory_report(data, limit=limit, out=out, progress=progress)

    om_dir = out / "omniglot"
    # the recipe at 28x28: at 40x40 (the recipe's side) training takes about 2x as long, past the demo's 15 minutes
    om_cfg = recipe("omniglot", **OMNIGLOT_28, episodes=omniglot_episodes, time_budget_s=omniglot_budget_s, fce=fce,
                    val_every=4 if quick else 500, val_episodes=2 if quick else 100, data=_s(data), **pretrain)
    report["omniglot_training"] = train(om_cfg, om_dir, progress=progress)
    model = load_checkpoint(om_dir)
    runs = load_oneshot_runs(omniglot_dir(data) / "one-shot-sample", size=om_cfg.image_size)
    report["oneshot"] = eval_oneshot(model, runs)
    _, _, val_x, val_groups = load_sets(om_cfg)
    n_eval = 10 if quick else 1000
    features = episode_features(model, val_x)  # the validation set embedded once for the three settings
    report["omniglot_validation"] = [
        evaluate_episodes(model, val_x, val_groups, n_way=w, k_shot=1, episodes=n_eval, within_group=within, seed=7,
                          features=features)
        for w, within in ((20, 1.0), (5, 0.0), (20, 0.0))
    ]

    fm_dir = out / "fashion"
    fm_cfg = recipe("fashion-mnist", episodes=fashion_episodes, time_budget_s=fashion_budget_s,
                    val_every=4 if quick else 100, val_episodes=2 if quick else 50, data=_s(data),
                    **{"pretrain_epochs": fashion_epochs, **pretrain})
    report["fashion_training"] = train(fm_cfg, fm_dir, progress=progress)
    report["fashion_learned"] = learned_memory_report(load_checkpoint(fm_dir), data, limit=limit, progress=progress)

    (out / "demo.json").write_text(json.dumps(report, indent=2))
    write_report(report, out, runs[0], model)
    return report


def _s(path) -> str | None:
    return None if path is None else str(path)




def learned_memory_report(model, data=None, *, k: int = 64, limit: int | None = None, progress: bool = True) -> dict:
    """Fashion-MNIST as a memory of learned g embeddings; test images embedded with h and queried.

    The memory chooses its own temperature (``temperature="auto"``: leave-one-out on its
    own slots, see :mod:`engine.tuning.temperature`); the model's was learned on 50-slot episodes,
    and a 60k-slot memory wants a sharper one. FCE models, whose g sees the whole support
    set and whose h reads the memory, keep their own temperature.
    """
    xtr, ytr = load_fashion_mnist(data, "train")
    xte, yte = load_fashion_mnist(data, "test")
    if limit:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    own = float(model.temperature.detach())
    t0 = time.perf_counter()
    if model.query_lstm is None:  # every slot is g'(x) alone
        g = model.backbone_features(as_input(xtr))[0].numpy()
        memory = Memory(model.dim, metric="cosine", index="Flat")  # temperature="auto"
        memory.add(g, ytr.tolist())
    else:  # FCE: g sees the whole support set, and h reads the memory with the model's own temperature
        memory = model.to_memory(as_input(xtr), ytr, temperature=own)
    build_s = time.perf_counter() - t0
    predicted, bounds = [], []
    t0 = time.perf_counter()
    for lo in tqdm(range(0, len(xte), 1000), desc="querying (learned)", unit="batch", disable=not progress):
        res = model.query_memory(memory, as_input(xte[lo : lo + 1000]), k=k)
        predicted.append(res.labels)
        bounds.append(res.tail_bound)
    query_s = time.perf_counter() - t0
    predicted, bounds = np.concatenate(predicted), np.concatenate(bounds)
    stats = memory.stats()
    return {"embedding": f"matching-network g/h ({model.dim}-d)", "views": model.views, "slots": stats.slots,
            "queries": int(len(xte)),
            "k": k, "temperature": memory.temperature, "model_temperature": own,
            "temperature_report": None if memory.temperature_report is None else memory.temperature_report.as_dict(),
            "accuracy": float((predicted == yte).mean()),
            "tail_bound_median": float(np.median(bounds)), "embed_and_write_s": build_s,
            "embed_and_query_per_s": float(len(xte) / query_s), "bytes_per_slot": stats.bytes_total / stats.slots}


def write_report(report: dict, out: Path, run, model) -> None:
    """report.md plus PNG plots: training curves, the one-shot run, Fashion-MNIST accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {}
    for name in ("omniglot", "fashion"):
        f = out / name / "log.jsonl"
        logs[name] = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, name, title in zip(axes, ("omniglot", "fashion"),
                               ("Omniglot: within-alphabet 20-way 1-shot (validation alphabets)",
                                "Fashion-MNIST: 10-way 1-shot episodes (held-out training images)")):
        rows = [r for r in logs[name] if "episode" in r]  # the episodes (not a supervised stage's epochs)
        if rows:
            ax.plot([r["episode"] for r in rows], [r["train_acc"] for r in rows], marker="o",
                    label="training episodes")
            ax.plot([r["episode"] for r in rows], [r["val_acc"] for r in rows], marker="o", label="validation")
            ax.set_xlabel("episode")
            ax.set_ylabel("query accuracy")
        else:  # a supervised stage only
            rows = [r for r in logs[name] if r.get("pretrain")]
            ax.plot([r["epoch"] for r in rows], [r["train_acc"] for r in rows], marker="o",
                    label="supervised stage: training accuracy")
            ax.set_xlabel("supervised epoch")
            ax.set_ylabel("accuracy")
            title = title.split(":")[0] + ": supervised training (no episodes)"
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)

    # the official run: each test item, the training image the memory chose, right or wrong
    memory = model.to_memory(as_input(run.train), list(range(20)))
    res = model.query_memory(memory, as_input(run.test), k=20)
    fig, axes = plt.subplots(2, 20, figsize=(16, 2.2))
    for i in range(20):
        axes[0, i].imshow(run.test[i], cmap="gray")
        chosen = int(res.labels[i])
        axes[1, i].imshow(run.train[chosen], cmap="gray")
        ok = chosen == run.answer[i]
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
        for spine in axes[1, i].spines.values():
            spine.set_edgecolor("green" if ok else "red")
            spine.set_linewidth(3)
    axes[0, 0].set_ylabel("test", fontsize=8)
    axes[1, 0].set_ylabel("memory\\nanswer", fontsize=8)
    fig.suptitle(f"{run.name}: 20-way one-shot through engine.Memory (green right, red wrong)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "oneshot.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = ["64-d PCA pixels", "learned (Matching Network)"]
    accs = [report["pca"]["accuracy"], report["fashion_learned"]["accuracy"]]
    bars = ax.bar(names, accs, color=["#999999", "#1f77b4"])
    ax.bar_label(bars, labels=[f"{a:.4f}" for a in accs])
    ax.set_ylim(min(accs) - 0.05, 1.0)
    ax.set_ylabel("test accuracy (10k queries)")
    ax.set_title(f"Fashion-MNIST: memory of {report['pca']['slots']:,} slots, top-{report['pca']['k']} attention",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fashion.png", dpi=110)
    plt.close(fig)

    om, val = report["omniglot_training"], report["omniglot_validation"]
    lines = [
        "# engine demo",
        "",
        f"Omniglot: Matching Network{' with FCE' if model.query_lstm is not None else ''} on "
        f"`images_background_small1` (+ rotations): {om['pretrain_epochs']} supervised epochs "
        f"({om['pretrain_s'] / 60:.1f} min), then {om['episodes']} episodes ({om['seconds'] / 60:.1f} min); "
        f"each image evaluated as the mean of {model.views} test-time views.",
        "",
        "| evaluation | result |",
        "|---|---|",
        f"| official one-shot runs ({report['oneshot']['runs']}): error "
        f"| {100 * report['oneshot']['error_rate']:.1f}% |",
    ]
    for r in val:
        kind = "within-alphabet" if r["within_alphabet"] else "random"
        lines.append(f"| validation alphabets, {kind} {r['n_way']}-way 1-shot ({r['episodes']} episodes): "
                     f"accuracy | {100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f} |")
    pca, fl = report["pca"], report["fashion_learned"]
    lines += [
        "",
        "![training](training.png)",
        "",
        "![one-shot run](oneshot.png)",
        "",
        f"Fashion-MNIST: {pca['slots']:,} training images as memory slots, {pca['queries']:,} test queries, "
        f"k = {pca['k']}.",
        "",
        "| embedding | accuracy | median tail bound | queries/s | bytes/slot |",
        "|---|---|---|---|---|",
        f"| 64-d PCA pixels | {pca['accuracy']:.4f} | {pca['tail_bound_median']:.3g} | {pca['queries_per_s']:,.0f} "
        f"| {pca['bytes_per_slot']:.0f} |",
        f"| learned Matching Network ({report['fashion_training']['pretrain_epochs']} supervised epochs, "
        f"{report['fashion_training']['episodes']} episodes, {fl['views']} test-time views; T = "
        f"{fl['temperature']:.3g}, chosen by the memory on its own slots) | {fl['accuracy']:.4f} "
        f"| {fl['tail_bound_median']:.3g} | {fl['embed_and_query_per_s']:,.0f} (incl. embedding) "
        f"| {fl['bytes_per_slot']:.0f} |",
        "",
        f"Against dense attention over all slots (PCA memory, {pca['full_attention_checked']:,} queries): top-k "
        f"alone agrees on the argmax {pca['full_attention_argmax_agreement']:.4f} (mean total variation "
        f"{pca['full_attention_tv_mean']:.2e}); with the estimated tail (the default) "
        f"{pca['estimated_tail_argmax_agreement']:.4f} ({pca['estimated_tail_tv_mean']:.2e}).",
        "",
        "![fashion](fashion.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def main() -> None:
    """``python examples/demo.py [--data DIR] [--out DIR] [--quick] [--fce] [--fashion-epochs N] [--json]``."""
    import argparse

    from engine.runtime import prepare

    prepare()  # before torch loads (engine.runtime)

    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description="Meta-train on Omniglot, evaluate one-shot, and compare "
                                             "Fashion-MNIST memories (PCA vs learned).")
    ap.add_argument("--data", type=Path, default=None, help="data directory (default: $ENGINE_DATA or ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="where report.md, plots and checkpoints go")
    ap.add_argument("--fce", action=argparse.BooleanOptionalAction, default=False,
                    help="Full Context Embeddings for the Omniglot model")
    ap.add_argument("--fashion-epochs", type=int, default=10,
                    help="Fashion-MNIST supervised epochs (the recipe's 20 add about 6 minutes)")
    ap.add_argument("--quick", action="store_true", help="a few episodes and small sets: a smoke run")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    report = run_demo(args.data, out=args.out, quick=args.quick, fce=args.fce, fashion_epochs=args.fashion_epochs,
                      progress=not args.json)
    if args.json:
        print(json.dumps(report))
        return
    table = Table(title="engine demo")
    table.add_column("measure")
    table.add_column("value", justify="right")
    runs = report["oneshot"]["runs"]
    table.add_row("Omniglot one-shot runs: error",
                  f"{100 * report['oneshot']['error_rate']:.1f}% ({runs} run{'s' if runs > 1 else ''})")
    for r in report["omniglot_validation"]:
        kind = "within-alphabet" if r["within_alphabet"] else "random"
        table.add_row(f"validation {kind} {r['n_way']}-way 1-shot",
                      f"{100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f}")
    pca, learned = report["pca"], report["fashion_learned"]
    table.add_row(f"Fashion-MNIST memory ({pca['slots']:,} slots), PCA pixels", f"{pca['accuracy']:.4f}")
    table.add_row("  vs dense attention: argmax agreement, top-k / estimated tail",
                  f"{pca['full_attention_argmax_agreement']:.4f} / {pca['estimated_tail_argmax_agreement']:.4f}")
    table.add_row("  median tail bound (worst case)", f"{pca['tail_bound_median']:.3g}")
    table.add_row("  queries per second", f"{pca['queries_per_s']:,.0f}")
    table.add_row(f"Fashion-MNIST memory ({learned['slots']:,} slots), learned", f"{learned['accuracy']:.4f}")
    Console().print(table)
    print(f"report: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
