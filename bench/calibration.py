"""Calibrated search breadth on data of different difficulty (engine/calibration.py).

    python bench/calibration.py --out runs/bench          # 200k slots, d=64; about a minute

For each distribution, a memory with ``index="auto"`` is built, and the table records:
- the nprobe its calibration chose and the recall@64 it measured (leave-one-out on its own vectors);
- recall@64 on fresh queries against an exact brute-force top-64 (faiss.knn);
- the calibration's time against the build's.
Writes calibration.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from engine import Memory
from engine.data import clustered
from engine.data.synthetic import LEARNED_LIKE, isotropic, uniform


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    n, d, m = args.slots, args.dim, args.queries
    cases = {
        "learned-like clusters": lambda: clustered(n, d, n_classes=100, seed=1, queries=m, **LEARNED_LIKE)[::2],
        "clustered (default)": lambda: clustered(n, d, n_classes=100, seed=2, queries=m)[::2],
        "isotropic, 2,000 classes": lambda: isotropic(n, d, n_classes=2000, seed=3, queries=m)[::2],
        "uniform": lambda: uniform(n, d, seed=4, queries=m)[::2],
    }
    rows = []
    for name, make in cases.items():
        x, *rest = make()
        q = rest[-1]
        y = np.zeros(len(x), np.int64)
        t0 = time.perf_counter()
        mem = Memory(d, index="auto")
        mem.add(x, y)
        build_s = time.perf_counter() - t0
        stats = mem.stats()
        unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
        _, truth = faiss.knn(unit(q), unit(x), 64, metric=faiss.METRIC_INNER_PRODUCT)
        found = mem.query(q, k=64).ids
        fresh = float(np.mean([len(np.intersect1d(a, b)) / 64 for a, b in zip(found, truth)]))
        cal = mem.calibration
        rows.append({"data": name, "index": stats.index, "nprobe": stats.nprobe, "recall_measured": stats.recall,
                     "recall_fresh_queries": fresh, "calibration_s": cal.seconds, "build_s": build_s})
        print(f"{name:26s} {stats.index:14s} nprobe {stats.nprobe:5d}  measured {stats.recall:.3f}  "
              f"fresh {fresh:.3f}  calibration {cal.seconds:.2f} s of {build_s:.1f} s", flush=True)
    doc = {"meta": {"machine": platform.platform(), "slots": n, "dim": d, "queries": m}, "results": rows}
    (args.out / "calibration.json").write_text(json.dumps(doc, indent=2))
    return rows


if __name__ == "__main__":
    main()
