"""Query latency, throughput, ingest rate and bytes per slot for Flat / IVF / HNSW.

    python bench/query_latency.py --sizes 10000 100000 --out runs/bench

For each support-set size and index it builds a memory of clustered synthetic
embeddings (engine.data.clustered, seeded), then measures:
- ingest: slots per second for ``add`` of the whole set, index training included;
- batched throughput: queries per second for a batch of ``--queries`` at k=64,
  and, in the same run, the bare FAISS ``index.search`` on the same index (our overhead);
- single-query latency: p50 and p99 over ``--singles`` one-row queries;
- bytes per slot from ``Memory.stats()`` (vectors, index, ids), against the raw float32 vector;
- recall@k against exact search (FAISS IndexFlatIP on the same vectors).
Writes ``query_latency.json`` and ``query_latency.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from engine import Memory
from engine.data import clustered


def ivf_spec(n: int) -> str:
    """IVF with about 4 sqrt(n) lists, no more than FAISS can train well on n points."""
    nlist = 1 << int(np.log2(max(16, min(4 * np.sqrt(n), n / 39))))
    return f"IVF{nlist},Flat"


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls (the least disturbed by a noisy machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(n: int, dim: int, spec: str, *, queries: int, singles: int, k: int, repeats: int, seed: int) -> dict:
    x, y, q, _ = clustered(n, dim, n_classes=max(10, n // 100), seed=seed, queries=queries)
    mem = Memory(dim, index=spec)
    t0 = time.perf_counter()
    mem.add(x, y)
    ingest_s = time.perf_counter() - t0

    batch_s = best_of(lambda: mem.query(q, k=k), repeats)
    qn = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)
    # the same FAISS index with the same search parameters, called directly
    faiss_index, params = mem._index._index, mem._index._params(None, k)
    if params is None:
        faiss_s = best_of(lambda: faiss_index.search(qn, k), repeats)
    else:
        faiss_s = best_of(lambda: faiss_index.search(qn, k, params=params), repeats)

    lat = []
    for i in range(singles):
        t0 = time.perf_counter()
        mem.query(q[i % len(q)], k=k)
        lat.append(time.perf_counter() - t0)
    lat_ms = np.array(lat) * 1e3

    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(dim)
    exact.add(xn)
    _, truth = exact.search(qn, k)
    found = mem.query(q, k=k).ids  # ids are 0..n-1 in insertion order
    recall = float(np.mean([len(np.intersect1d(f, t)) / k for f, t in zip(found, truth)]))

    stats = mem.stats()
    return {
        "size": n, "dim": dim, "index": spec, "active_index": stats.index, "k": k,
        "ingest_slots_per_s": n / ingest_s, "ingest_s": ingest_s,
        "batch_queries": queries, "batch_qps": queries / batch_s, "faiss_batch_qps": queries / faiss_s,
        "overhead_vs_faiss_batch": batch_s / faiss_s,
        "single_p50_ms": float(np.percentile(lat_ms, 50)), "single_p99_ms": float(np.percentile(lat_ms, 99)),
        "bytes_per_slot": stats.bytes_total / stats.slots,
        "bytes_per_slot_vs_raw": stats.bytes_total / stats.slots / (4 * dim),
        "recall_at_k": recall,
    }


def family(spec: str) -> str:
    """Flat, IVF or HNSW: one line per family in the plots (IVF's nlist varies with size)."""
    return next((f for f in ("IVF", "HNSW") if spec.startswith(f)), spec)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("batch_qps", "batched queries / s (k=64)"), ("single_p50_ms", "single query p50 latency (ms)"),
              ("bytes_per_slot", "bytes per slot")]
    for ax, (key, title) in zip(axes, panels):
        for fam in dict.fromkeys(family(r["index"]) for r in rows):
            pts = [r for r in rows if family(r["index"]) == fam]
            ax.plot([r["size"] for r in pts], [r[key] for r in pts], marker="o", label=fam)
        if key == "batch_qps":
            pts = [r for r in rows if family(r["index"]) == "Flat"]
            ax.plot([r["size"] for r in pts], [r["faiss_batch_qps"] for r in pts], "k--", lw=1, label="bare FAISS Flat")
        if key == "bytes_per_slot":
            for d in sorted({r["dim"] for r in rows}):
                ax.axhline(4 * d, color="grey", ls=":", label=f"raw float32 vector (d={d})")
        ax.set_xscale("log")
        if key == "bytes_per_slot":
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("slots in memory")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"engine query benchmark ({platform.machine()}, {faiss.omp_get_max_threads()} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--indexes", nargs="+", default=["Flat", "IVF", "HNSW32"],
                    help="FAISS factory strings; 'IVF' picks nlist from the size")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--singles", type=int, default=300)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [(n, ivf_spec(n) if s == "IVF" else s) for n in args.sizes for s in args.indexes]
    rows = []
    for n, spec in tqdm(plan, desc="benchmarks", unit="run"):
        rows.append(measure(n, args.dim, spec, queries=args.queries, singles=args.singles, k=args.k,
                            repeats=args.repeats, seed=args.seed))
    meta = {"machine": platform.platform(), "cpus": faiss.omp_get_max_threads(), "faiss": faiss.__version__,
            "numpy": np.__version__}
    (args.out / "query_latency.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    plot(rows, args.out / "query_latency.png")
    header = f"{'size':>8} {'index':>14} {'ingest/s':>10} {'batch q/s':>10} {'vs faiss':>8} {'p50 ms':>7} {'p99 ms':>7} {'B/slot':>7} {'recall':>6}"
    print(header)
    for r in rows:
        print(f"{r['size']:>8} {r['index']:>14} {r['ingest_slots_per_s']:>10.0f} {r['batch_qps']:>10.0f} "
              f"{r['overhead_vs_faiss_batch']:>8.2f} {r['single_p50_ms']:>7.2f} {r['single_p99_ms']:>7.2f} "
              f"{r['bytes_per_slot']:>7.0f} {r['recall_at_k']:>6.3f}")
    return rows


if __name__ == "__main__":
    main()
