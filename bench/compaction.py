"""Memory against accuracy: every compaction policy at budgets of 100%, 10%, 1% and 0.1% of the slots.

    python bench/compaction.py --out runs/bench
    python bench/compaction.py --fashion-checkpoint runs/demo/fashion --omniglot-checkpoint runs/demo/omniglot

Rows (each a memory of training embeddings answered for test embeddings, k = 64):
- fashion-learned: Fashion-MNIST, 60k train images embedded by a Matching Network
  trained on Fashion-MNIST (g for slots, h for the 10k test queries);
- fashion-pca: the same images as 64-d PCA pixels, the learning-free row that
  tells the effect of the embedding from the effect of compaction;
- omniglot-learned: the validation alphabets of small2 embedded by the Omniglot
  model, drawers 1-15 of each character as slots, drawers 16-20 as queries.
A checkpoint that is not given (or not found) is trained first, within a time cap.
A budget below the number of classes is raised to one slot per class (and reported).
Writes compaction.json and compaction.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine import Memory
from engine.compaction import POLICIES
from engine.data import as_input

FRACTIONS = (1.0, 0.1, 0.01, 0.001)


def embed(model, slots: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """g for the slots, h for the queries (with FCE, h reads the whole slot set in-batch)."""
    with torch.no_grad():
        model.eval()
        g = model.embed_support(as_input(slots), batch_size=2048)
        h = model.embed_queries(as_input(queries), support=g, batch_size=2048)
    return g.numpy(), h.numpy()


def checkpoint(path: Path | None, dataset: str, budget_s: float, out: Path):
    from engine.train import OMNIGLOT_28, load_checkpoint, recipe, train

    if path is not None and (path / "config.json").exists():
        return load_checkpoint(path)
    folder = out / f"{dataset}-model"
    if not (folder / "best.pt").exists():
        cfg = (recipe("fashion-mnist", pretrain_epochs=4) if dataset == "fashion-mnist"  # ~2.5 min
               else recipe("omniglot", **OMNIGLOT_28, episodes=3000, time_budget_s=budget_s, val_episodes=100))
        train(cfg, folder)
    return load_checkpoint(folder)


def rows(args) -> dict:
    """name -> (slot vectors, slot labels, query vectors, query labels, temperature)."""
    from engine.data import load_fashion_mnist, pca_embed
    from engine.data.omniglot import VALIDATION_ALPHABETS, load_background

    out = {}
    xtr, ytr = load_fashion_mnist(args.data, "train")
    xte, yte = load_fashion_mnist(args.data, "test")
    if args.limit:
        xtr, ytr, xte, yte = xtr[: args.limit], ytr[: args.limit], xte[: args.limit], yte[: args.limit]
    if "fashion-learned" in args.rows:
        model = checkpoint(args.fashion_checkpoint, "fashion-mnist", args.train_budget, args.out)
        g, h = embed(model, xtr, xte)
        out["fashion-learned"] = (g, ytr, h, yte, args.fashion_temperature or model.temperature.item())
    if "fashion-pca" in args.rows:
        ptr, pte = pca_embed(xtr, xte, 64)
        out["fashion-pca"] = (ptr, ytr, pte, yte, 0.01)
    if "omniglot-learned" in args.rows:
        model = checkpoint(args.omniglot_checkpoint, "omniglot", args.train_budget, args.out)
        val = load_background("small2", args.data, alphabets=VALIDATION_ALPHABETS, size=model.image_size or 28)
        n_chars, side = len(val), val.images.shape[2:]
        labels = np.repeat(np.arange(n_chars), 15)
        slots = val.images[:, :15].reshape(-1, *side)
        queries = val.images[:, 15:].reshape(-1, *side)
        g, h = embed(model, slots, queries)
        out["omniglot-learned"] = (g, labels, h, np.repeat(np.arange(n_chars), 5), model.temperature.item())
    return out


def measure(name, z, y, q, qy, temperature, fraction, policy, k, seed) -> dict:
    mem = Memory(z.shape[1], index="Flat", temperature=temperature, track_usage=policy == "age")  # "age" reads them
    mem.add(z, y)
    n, classes = len(mem), len(np.unique(y))
    budget = max(classes, int(round(fraction * n)))
    t0 = time.perf_counter()
    if budget < n:
        mem.compact(budget=budget, policy=policy, seed=seed)
    compact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    predicted = np.concatenate([mem.query(q[lo : lo + 1000], k=k).labels for lo in range(0, len(q), 1000)])
    query_s = time.perf_counter() - t0
    stats = mem.stats()
    return {"row": name, "policy": policy, "fraction": fraction, "budget": budget, "slots": stats.slots,
            "bytes": stats.bytes_total, "accuracy": float((predicted == qy).mean()), "compact_s": compact_s,
            "queries_per_s": len(q) / query_s}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["row"] for r in results))
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in results if r["row"] == name]
        full = next(r for r in mine if r["fraction"] == 1.0)
        for policy in dict.fromkeys(r["policy"] for r in mine if r["policy"] != "full"):
            pts = sorted([full] + [r for r in mine if r["policy"] == policy], key=lambda r: r["bytes"])
            ax.plot([r["bytes"] for r in pts], [r["accuracy"] for r in pts], marker="o", label=policy)
        ax.axhline(full["accuracy"], color="k", ls="--", lw=1, label=f"full memory ({full['accuracy']:.3f})")
        ax.set_xscale("log")
        # ticks at 1 and 3 x 10^k bytes, or at 1, 2 and 5 x 10^k for a range under a decade (Omniglot's)
        sizes = [r["bytes"] for r in mine]
        subs = (1.0, 3.0) if max(sizes) / min(sizes) >= 10 else (1.0, 2.0, 5.0)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(unit="B", places=0))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("bytes held by the memory")
        ax.set_ylabel("test accuracy")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("accuracy against memory; budgets of 100%, 10%, 1%, 0.1% of the slots", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--fashion-checkpoint", type=Path, default=Path("runs/demo/fashion"))
    ap.add_argument("--omniglot-checkpoint", type=Path, default=Path("runs/demo/omniglot"))
    ap.add_argument("--fashion-temperature", type=float, default=None,
                    help="the learned Fashion-MNIST memory's temperature (default: the model's; make demo "
                         "chooses one on held-out training images and reports it)")
    ap.add_argument("--rows", nargs="+", default=["fashion-learned", "fashion-pca", "omniglot-learned"])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="use only this many Fashion-MNIST images (smoke runs)")
    ap.add_argument("--train-budget", type=float, default=300.0,
                    help="seconds of episodes for a missing Omniglot checkpoint (a missing Fashion-MNIST one gets "
                         "4 supervised epochs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = rows(args)
    plan = [(name, f, p) for name in data for f in args.fractions for p in (args.policies if f < 1 else ["full"])]
    results = []
    for name, fraction, policy in tqdm(plan, desc="compaction runs", unit="run"):
        z, y, q, qy, temperature = data[name]
        results.append(measure(name, z, y, q, qy, temperature, fraction, "merge" if policy == "full" else policy,
                               args.k, args.seed) | ({"policy": "full"} if policy == "full" else {}))
    meta = {"machine": platform.platform(), "k": args.k, "limit": args.limit}
    (args.out / "compaction.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, args.out / "compaction.png")
    print(f"{'row':>17} {'policy':>9} {'budget':>7} {'slots':>6} {'bytes':>11} {'accuracy':>8} {'compact s':>9}")
    for r in results:
        print(f"{r['row']:>17} {r['policy']:>9} {r['fraction']:>7.3%} {r['slots']:>6} {r['bytes']:>11,} "
              f"{r['accuracy']:>8.4f} {r['compact_s']:>9.2f}")
    return results


if __name__ == "__main__":
    main()
