"""Top-k alone against top-k plus the estimated tail (``probs="full"``), both against dense
attention over every slot in float64.

    python bench/tail.py --out runs/bench                      # 1M synthetic + Fashion-MNIST; ~15 min
    python bench/tail.py --slots 200000 --cases learned-like   # a quicker look

For each case a memory is built and 1,000 queries are answered twice (``probs="top-k"``
and ``probs="full"``, the same top-k). The table records, per mode: mean and p99 total
variation of the class probabilities against dense attention, argmax agreement with it,
and the time of a batch (median of 3, the ratio taken within the run); plus the true
attention mass outside the top-k next to the estimate and the certificate (``tail_bound``).

Cases: ``learned-like`` and ``isotropic`` (2,000 classes) synthetic memories at ``--slots``
(T = 0.05, ``auto``); ``fashion-pca``: the 60k Fashion-MNIST training images as 64-d PCA
pixels (T = 0.01, Flat, the demo's memory); ``fashion-learned``: the same images embedded
by a Matching Network trained here for ``--fashion-episodes`` episodes (its learned T).
Writes tail.json, tail.md and tail.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from engine import Memory
from engine.testing import dense_attention, omitted_mass, total_variation

K = 64


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_case(name: str, x, y, q, temperature: float, index: str, metric: str = "cosine") -> dict:
    mem = Memory(x.shape[1], index=index, temperature=temperature, metric=metric, probs="full")
    warm = Memory(x.shape[1], index="IVF1,Flat", temperature=temperature, metric=metric, probs="full")
    warm.add(x[:64], y[:64])
    warm.query(x[:2], k=4)  # the kernels compile (or load from their cache) before anything is timed
    for lo in range(0, len(x), 100_000):
        mem.add(x[lo:lo + 100_000], y[lo:lo + 100_000])
    t0 = time.perf_counter()
    full = mem.query(q, k=K)  # the first full query builds the cells
    summaries_s = time.perf_counter() - t0
    topk = mem.query(q, k=K, probs="top-k")
    topk_s = timed(lambda: mem.query(q, k=K, probs="top-k"))
    full_s = timed(lambda: mem.query(q, k=K))
    singles = q[:50]
    topk_one = timed(lambda: [mem.query(v, k=K, probs="top-k") for v in singles]) / len(singles)
    full_one = timed(lambda: [mem.query(v, k=K) for v in singles]) / len(singles)
    classes = full.classes
    # dense float64 attention over every slot (engine.testing); the memory's ids are rows of x
    ref = dense_attention(x, y, q, temperature=temperature, metric=metric, classes=classes)
    omitted = omitted_mass(x, q, full.ids, temperature=temperature, metric=metric)
    row = {"case": name, "slots": len(x), "classes": int(len(classes)), "temperature": temperature,
           "index": mem.stats().index, "nprobe": mem.stats().nprobe, "k": K, "queries": int(len(q)),
           "true_omitted_median": float(np.median(omitted)),
           "tail_estimate_median": float(np.median(full.tail_estimate)),
           "tail_bound_median": float(np.median(full.tail_bound)), "exact_bound": bool(full.exact_bound),
           "cells_build_s": summaries_s, "topk_batch_s": topk_s, "full_batch_s": full_s,
           "full_vs_topk_time": full_s / topk_s, "topk_single_ms": 1e3 * topk_one, "full_single_ms": 1e3 * full_one,
           "full_vs_topk_single": full_one / topk_one, "bytes_per_slot": mem.stats().bytes_total / len(x),
           "cells_bytes_per_slot": mem.stats().bytes_tail / len(x)}
    for mode, res in (("topk", topk), ("full", full)):
        tv = total_variation(res.probs, ref)
        row[f"{mode}_tv_mean"], row[f"{mode}_tv_p99"] = float(tv.mean()), float(np.quantile(tv, 0.99))
        row[f"{mode}_argmax_agreement"] = float((np.argmax(res.probs, axis=1) == np.argmax(ref, axis=1)).mean())
        if mode == "full":  # exact where scored, estimated beyond: its error is at most twice the bound
            row["bound_covers_tv"] = float((tv <= 2 * res.tail_bound + 1e-6).mean())
    return row


def fashion(data, episodes: int, out: Path, learned: bool):
    """(PCA train/test, learned train/test embeddings and T or None, labels) of Fashion-MNIST."""
    from engine.data import as_input, load_fashion_mnist, pca_embed
    from engine.train import load_checkpoint, recipe, train

    xtr, ytr = load_fashion_mnist(data, "train")
    xte, _ = load_fashion_mnist(data, "test")
    pca = pca_embed(xtr, xte, 64)
    if not learned:
        return pca, None, ytr
    cfg = recipe("fashion-mnist", episodes=episodes, val_every=max(1, episodes), val_episodes=20,
                 data=None if data is None else str(data))  # fce off: h needs no support to embed
    train(cfg, out / "fashion-model", progress=True)
    model = load_checkpoint(out / "fashion-model").eval()
    import torch

    from engine.nn.matching import INFERENCE_BATCH

    with torch.no_grad():
        g = model.embed_support(torch.as_tensor(as_input(xtr)), batch_size=INFERENCE_BATCH).numpy()
        h = model.embed_queries(torch.as_tensor(as_input(xte[:1000])), batch_size=1000).numpy()
    return pca, (g, h, float(model.temperature.detach())), ytr


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in rows]
    at = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.bar(at - 0.2, [r["topk_tv_mean"] for r in rows], 0.4, label="top-k renormalised")
    a.bar(at + 0.2, [r["full_tv_mean"] for r in rows], 0.4, label="top-k + estimated tail")
    a.set_xticks(at, names, rotation=15)
    a.set_ylabel("mean total variation vs dense attention")
    a.set_title(f"class probabilities against full attention (k = {K})")
    a.legend()
    b.bar(at - 0.27, [r["true_omitted_median"] for r in rows], 0.27, label="true mass outside top-k")
    b.bar(at, [r["tail_estimate_median"] for r in rows], 0.27, label="tail_estimate")
    b.bar(at + 0.27, [r["tail_bound_median"] for r in rows], 0.27, label="tail_bound (certificate)")
    b.set_xticks(at, names, rotation=15)
    b.set_ylabel("median over queries")
    b.set_title("attention left out: truth, estimate, bound")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    from engine.data.synthetic import DISTRIBUTIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--cases", nargs="+", default=["learned-like", "isotropic", "fashion-pca", "fashion-learned"])
    ap.add_argument("--fashion-episodes", type=int, default=300)
    ap.add_argument("--data", type=Path, default=None, help="datasets folder (default: $ENGINE_DATA or ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        if case in ("learned-like", "isotropic"):
            x, y, q, _ = DISTRIBUTIONS[case](args.slots, 64, 0, args.queries)
            rows.append(run_case(case, x, y, q, 0.05, "auto"))
        elif case.startswith("fashion"):
            if not any(r["case"].startswith("fashion") for r in rows):
                pca, learned, labels = fashion(args.data, args.fashion_episodes, args.out,
                                               "fashion-learned" in args.cases)
            if case == "fashion-pca":
                rows.append(run_case(case, pca[0], labels, pca[1][:args.queries], 0.01, "Flat"))
            else:
                g, h, temperature = learned
                rows.append(run_case(case, g, labels, h[:args.queries], temperature, "auto"))
        else:
            raise SystemExit(f"unknown case {case!r}")
        r = rows[-1]
        print(f"{case:16s} TV {r['topk_tv_mean']:.4f} -> {r['full_tv_mean']:.4f} (p99 {r['topk_tv_p99']:.3f} -> "
              f"{r['full_tv_p99']:.3f}), argmax {r['topk_argmax_agreement']:.4f} -> {r['full_argmax_agreement']:.4f}, "
              f"time x{r['full_vs_topk_time']:.2f}; omitted {r['true_omitted_median']:.3f}, estimate "
              f"{r['tail_estimate_median']:.3f}, bound {r['tail_bound_median']:.3f}", flush=True)
    doc = {"meta": {"machine": platform.platform(), "k": K, "queries": args.queries}, "results": rows}
    (args.out / "tail.json").write_text(json.dumps(doc, indent=2))
    head = ("| case | slots | classes | T | index | mean TV top-k / full | p99 TV top-k / full | argmax agree top-k / "
            "full | full / top-k time, batch / single | true omitted (median) | tail_estimate | tail_bound |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['case']} | {r['slots']:,} | {r['classes']:,} | {r['temperature']:.3g} | {r['index']} "
                     f"| {r['topk_tv_mean']:.4f} / {r['full_tv_mean']:.4f} | {r['topk_tv_p99']:.4f} / "
                     f"{r['full_tv_p99']:.4f} | {r['topk_argmax_agreement']:.4f} / {r['full_argmax_agreement']:.4f} "
                     f"| {r['full_vs_topk_time']:.2f}x / {r['full_vs_topk_single']:.2f}x "
                     f"| {r['true_omitted_median']:.3f} | "
                     f"{r['tail_estimate_median']:.3f} | {r['tail_bound_median']:.3f} |")
    (args.out / "tail.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "tail.png")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
