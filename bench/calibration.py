"""Calibrated search breadth on data of different difficulty (engine/index/calibration.py).

    python bench/calibration.py --out runs/bench          # 200k slots, d=64; a few minutes
    python bench/calibration.py --slots 1000000 --data isotropic-hard learned-like

For each of ``engine.data.synthetic.DISTRIBUTIONS``, three memories over the same slots:
- ``Flat``: exact search, the reference for speed and accuracy;
- ``answer``: the default ``Memory(dim)`` (index "auto", temperature "auto"), whose
  breadth is calibrated on the answer;
- ``recall``: the same with ``recall=0.98``, calibrated on recall@64.
Each at the temperature the default memory chose, k = 64, on fresh queries: the
breadth chosen, what calibration measured and what it cost next to the build, a
batch of queries and single queries (ms), accuracy, agreement of the class answer
with exact search's (float32 brute force, ``faiss.knn``), and recall@64.
Writes calibration.json and calibration.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from engine import Memory, SearchSettings
from engine.data.synthetic import DISTRIBUTIONS

K = 64
SINGLES = 200


def _unit(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a / np.linalg.norm(a, axis=1, keepdims=True), dtype=np.float32)


def _exact(x, y, q, temperature):
    """(top-64 ids, class answer) of exact search at ``temperature``."""
    scores, ids = faiss.knn(_unit(q), _unit(x), K, metric=faiss.METRIC_INNER_PRODUCT)
    a = np.exp((scores - scores[:, :1]) / temperature)
    labels = y[ids]
    answer = np.empty(len(q), y.dtype)
    for i in range(len(q)):
        classes, inv = np.unique(labels[i], return_inverse=True)
        answer[i] = classes[np.bincount(inv, a[i]).argmax()]
    return ids, answer


def _measure(mem, q, qy, truth, exact_answer) -> dict:
    mem.query(q[:10], k=K)
    t0 = time.perf_counter()
    res = mem.query(q, k=K)
    batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(min(SINGLES, len(q))):
        mem.query(q[i:i + 1], k=K)
    single = (time.perf_counter() - t0) / min(SINGLES, len(q))
    got = np.asarray(res.labels)
    stats = mem.stats()
    return {"index": stats.index, "nprobe": stats.nprobe, "batch_s": batch, "single_ms": 1e3 * single,
            "accuracy": float(np.mean(got == qy)), "agree_exact": float(np.mean(got == exact_answer)),
            "recall_fresh": float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(res.ids, truth)]))}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--data", nargs="+", default=list(DISTRIBUTIONS), choices=list(DISTRIBUTIONS))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    n, d, m = args.slots, args.dim, args.queries
    rows = []
    for name in args.data:
        x, y, q, qy = DISTRIBUTIONS[name](n, d, 1, m)
        t0 = time.perf_counter()
        answer = Memory(d)
        answer.add(x, y)
        answer_build = time.perf_counter() - t0
        t = answer.temperature
        t0 = time.perf_counter()
        recall = Memory(d, recall=0.98, temperature=t)
        recall.add(x, y)
        recall_build = time.perf_counter() - t0
        flat = Memory(d, index="Flat", temperature=t)
        flat.add(x, y)
        truth, exact_answer = _exact(x, y, q, t)
        row = {"data": name, "slots": n, "temperature": t}
        for method, mem, build in (("Flat", flat, None), ("answer", answer, answer_build),
                                   ("recall", recall, recall_build)):
            r = _measure(mem, q, qy, truth, exact_answer)
            cal = mem.calibration
            if cal is not None:
                r.update(build_s=build, calibration_s=cal.seconds, target=cal.target, recall_measured=cal.recall,
                         agreement_measured=cal.agreement, tv_measured=cal.tv)
            row[method] = r
        for method in ("answer", "recall"):
            row[method]["speedup_vs_flat"] = row["Flat"]["batch_s"] / row[method]["batch_s"]
            row[method]["single_speedup_vs_flat"] = row["Flat"]["single_ms"] / row[method]["single_ms"]
        if row["answer"]["nprobe"] is not None:  # the same index at the recall breadth: what the answer saves
            answer.search_settings = SearchSettings(nprobe=row["recall"]["nprobe"])
            row["answer_at_recall_breadth"] = _measure(answer, q, qy, truth, exact_answer)
            answer.search_settings = SearchSettings()
        rows.append(row)
        a, r, f = row["answer"], row["recall"], row["Flat"]
        print(f"{name:15s} T {t:.4f}  Flat acc {f['accuracy']:.3f}  |  answer nprobe {a['nprobe']} "
              f"acc {a['accuracy']:.3f} agree {a['agree_exact']:.3f} {a['speedup_vs_flat']:.1f}x  |  "
              f"recall nprobe {r['nprobe']} acc {r['accuracy']:.3f} {r['speedup_vs_flat']:.1f}x", flush=True)
    doc = {"meta": {"machine": platform.platform(), "slots": n, "dim": d, "queries": m, "k": K}, "results": rows}
    (args.out / "calibration.json").write_text(json.dumps(doc, indent=2))
    plot(rows, args.out / "calibration.png")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["data"] for r in rows]
    at = np.arange(len(rows))
    for i, (method, colour) in enumerate((("answer", "tab:blue"), ("recall", "tab:orange"))):
        left.bar(at + (i - 0.5) * 0.38, [r[method]["speedup_vs_flat"] for r in rows], 0.38, label=method,
                 color=colour)
        right.bar(at + (i - 0.5) * 0.38, [r[method]["accuracy"] - r["Flat"]["accuracy"] for r in rows], 0.38,
                  label=method, color=colour)
    left.set_ylabel("batch speed-up over exact Flat")
    left.set_yscale("log")
    right.set_ylabel("accuracy minus Flat's")
    right.axhline(-0.01, color="grey", ls="--", lw=1)
    for ax in (left, right):
        ax.set_xticks(at, names, rotation=15)
        ax.legend()
    fig.suptitle(f"Breadth calibrated on the answer or on recall@64, {rows[0]['slots']:,} slots, k = {K}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
