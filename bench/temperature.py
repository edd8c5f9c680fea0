"""The temperature a memory chooses against a fixed one and against plain kNN.

    python bench/temperature.py --out runs/bench              # Fashion-MNIST PCA + synthetic
    python bench/temperature.py --cases learned-like --slots 20000
    python bench/temperature.py --cases learned-like --ingest-slots 1000000   # the cost of choosing at 1M

For each case a default ``Memory`` (``temperature="auto"``, top-k probabilities, k = 64)
holds the training vectors and answers held-out queries. Recorded: accuracy and held-out
NLL at the chosen temperature and at T = 0.1 (the old default), the same with
``probs="full"``, and the accuracy of brute-force cosine kNN (majority of the k nearest,
k = 1, 5, 10, 25), the baseline a user would write. Writes temperature.json and .md.

Cases: ``fashion-pca`` (60k Fashion-MNIST training images as 64-d PCA pixels, 10k test
images), and the synthetic ``learned-like`` and ``isotropic`` distributions at ``--slots``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from engine import Memory

K = 64


def knn_accuracy(x, y, q, qy, ks=(1, 5, 10, 25), chunk=500) -> dict:
    """Accuracy of majority-vote cosine kNN (float32 brute force), per k."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    classes, yi = np.unique(y, return_inverse=True)
    right = {k: 0 for k in ks}
    for lo in range(0, len(q), chunk):
        s = qn[lo:lo + chunk] @ xn.T
        top = np.argsort(-s, axis=1)[:, :max(ks)]
        for k in ks:
            votes = np.zeros((len(top), len(classes)))
            np.add.at(votes, (np.repeat(np.arange(len(top)), k), yi[top[:, :k]].ravel()), 1.0)
            right[k] += int((classes[votes.argmax(axis=1)] == qy[lo:lo + chunk]).sum())
    return {f"knn{k}_accuracy": right[k] / len(q) for k in ks}


def scores(mem: Memory, q, qy, probs: str) -> tuple[float, float]:
    res = mem.query(q, k=K, probs=probs)
    col = np.searchsorted(res.classes, qy)
    known = (col < len(res.classes)) & (res.classes[np.minimum(col, len(res.classes) - 1)] == qy)
    own = np.where(known, res.probs[np.arange(len(q)), np.minimum(col, len(res.classes) - 1)], 0.0)
    return float((res.labels == qy).mean()), float(-np.log(np.maximum(own, 1e-6)).mean())


def run_case(name, x, y, q, qy) -> dict:
    mem = Memory(x.shape[1])
    for lo in range(0, len(x), 100_000):
        mem.add(x[lo:lo + 100_000], y[lo:lo + 100_000])
    report = mem.temperature_report
    row = {"case": name, "slots": len(x), "queries": len(q), "classes": int(len(np.unique(y))),
           "chosen_temperature": mem.temperature, "loo_nll": report.nll, "loo_nll_at_0.1": report.nll_previous
           if report.previous == 0.1 else None, "loo_ece": report.ece, "loo_ece_at_0.1": report.ece_previous}
    for label, t in (("auto", mem.temperature), ("t0.1", 0.1)):
        mem.temperature = t
        for probs in ("top-k", "full"):
            acc, nll = scores(mem, q, qy, probs)
            row[f"{label}_{probs}_accuracy"], row[f"{label}_{probs}_nll"] = acc, nll
    row.update(knn_accuracy(x, y, q, qy))
    return row


def ingest_cost(slots: int) -> dict:
    """Seconds to write ``slots`` learned-like slots in batches of 100k, and a batch of
    1,000 queries then, with ``temperature="auto"`` against a fixed T = 0.1, in one run."""
    import time

    from engine.data.synthetic import DISTRIBUTIONS

    x, y, q, _ = DISTRIBUTIONS["learned-like"](slots, 64, 0, 1000)
    out = {"slots": slots}
    for label, t in (("auto", "auto"), ("fixed", 0.1)):
        t0 = time.perf_counter()
        mem = Memory(64, temperature=t)
        for lo in range(0, slots, 100_000):
            mem.add(x[lo:lo + 100_000], y[lo:lo + 100_000])
        out[f"{label}_ingest_s"] = time.perf_counter() - t0
        # checks of the search breadth on the slots written since it was measured (engine/index/calibration.py)
        out[f"{label}_drift_checks"] = len(mem.calibration_checks)
        out[f"{label}_drift_checks_s"] = float(sum(c.seconds for c in mem.calibration_checks))
        mem.query(q, k=K)
        t0 = time.perf_counter()
        mem.query(q, k=K)
        out[f"{label}_query_s"] = time.perf_counter() - t0
        out[f"{label}_temperature"] = mem.temperature
    out["ingest_ratio"] = out["auto_ingest_s"] / out["fixed_ingest_s"]
    return out


def main(argv=None) -> list[dict]:
    from engine.data.synthetic import DISTRIBUTIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["fashion-pca", "learned-like", "isotropic"])
    ap.add_argument("--slots", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--data", type=Path, default=None, help="datasets folder (default: $ENGINE_DATA or ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--ingest-slots", type=int, default=0,
                    help="also time writing this many slots with auto against a fixed temperature")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        if case == "fashion-pca":
            from engine.data import load_fashion_mnist, pca_embed

            xtr, ytr = load_fashion_mnist(args.data, "train")
            xte, yte = load_fashion_mnist(args.data, "test")
            tr, te = pca_embed(xtr, xte, 64)
            rows.append(run_case(case, tr, ytr, te[:args.queries], yte[:args.queries]))
        elif case in DISTRIBUTIONS:
            x, y, q, qy = DISTRIBUTIONS[case](args.slots, 64, 0, args.queries)
            rows.append(run_case(case, x, y, q, qy))
        else:
            raise SystemExit(f"unknown case {case!r}")
        print(json.dumps(rows[-1]), flush=True)
    cost = ingest_cost(args.ingest_slots) if args.ingest_slots else None
    if cost:
        print(json.dumps(cost), flush=True)
    (args.out / "temperature.json").write_text(json.dumps({"meta": {"machine": platform.platform(), "k": K},
                                                           "results": rows, "ingest": cost}, indent=2))
    lines = ["| case | slots | classes | T chosen | accuracy auto / T=0.1 (top-k) | accuracy auto / T=0.1 (full) "
             "| held-out NLL auto / T=0.1 (top-k) | best kNN accuracy |", "|" + "---|" * 8]
    for r in rows:
        best = max(v for key, v in r.items() if key.startswith("knn"))
        lines.append(f"| {r['case']} | {r['slots']:,} | {r['classes']:,} | {r['chosen_temperature']:.3g} "
                     f"| {r['auto_top-k_accuracy']:.4f} / {r['t0.1_top-k_accuracy']:.4f} "
                     f"| {r['auto_full_accuracy']:.4f} / {r['t0.1_full_accuracy']:.4f} "
                     f"| {r['auto_top-k_nll']:.3f} / {r['t0.1_top-k_nll']:.3f} | {best:.4f} |")
    (args.out / "temperature.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
