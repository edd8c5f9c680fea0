"""A sharded memory on Ray against one exact memory, across shard counts.

    python bench/shards.py --out runs/bench                  # 4M slots, d=64, 1/2/4 shards (~15 min)
    python bench/shards.py --slots 20000 --shards 1 2 --out runs/smoke
    python bench/shards.py --slots 400000 --shards 4 --data isotropic   # another distribution

For each shard count, a :class:`engine.cluster.ShardedMemory` (index ``auto`` on every
shard, durable, on a local Ray instance) is filled with the same slots
(``engine.data.synthetic.DISTRIBUTIONS["learned-like"]``, or ``--data``) and measured:

- ingest time (written as a stream of 100k batches, WAL and index training included);
- batched throughput (1,000 queries a call, k=64) and single-query p50 / p99;
- argmax agreement and recall@64 against one exact (Flat) Memory holding every slot;
- bytes per slot (RAM: the shards' stats summed);
- per-shard time: each shard answering the batch alone, and the driver's merge per query.

On this machine every shard shares the same 2 cores, so the end-to-end figures show
contention, not scale-out. Shard s of n searches for its share of each query's top-64
(``engine.index.share_k(64, 1/n)``: about 64/n plus two binomial standard deviations)
and calibrates its nprobe for that (the plot labels each point with it). The projection
for one shard a machine is stated as one:
a query costs the slowest shard's time alone plus the merge plus the measured RPC
overhead, so ``batch / (max shard time + merge + rpc)`` queries/s per driver.
Writes shards.json and shards.png to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

K = 64
T = 0.03
BATCH = 100_000


def run(slots: int, shard_counts: list[int], queries: int, singles: int, seed: int, root: Path,
        data: str = "learned-like") -> dict:
    import ray
    from scale import timed  # the same timing rule as the scale benchmark (fastest of a few)
    from tqdm import tqdm

    from engine import Memory
    from engine.cluster import ShardedMemory, merge
    from engine.data.synthetic import DISTRIBUTIONS

    x, y, q, _ = DISTRIBUTIONS[data](slots, 64, seed, queries)
    ids = np.arange(slots, dtype=np.int64)
    exact = Memory(64, index="Flat", temperature=T)
    for lo in tqdm(range(0, slots, BATCH), desc="exact reference", unit="batch"):
        exact.add(x[lo:lo + BATCH], y[lo:lo + BATCH], ids=ids[lo:lo + BATCH])
    t0 = time.perf_counter()
    ref = exact.query(q, k=K)
    exact_s = time.perf_counter() - t0
    del exact
    rows = []
    for n in shard_counts:
        mem = ShardedMemory(64, shards=n, path=root / f"s{n}", index="auto", temperature=T)
        t0 = time.perf_counter()
        for lo in tqdm(range(0, slots, BATCH), desc=f"ingest, {n} shard{'s' * (n > 1)}", unit="batch"):
            mem.add(x[lo:lo + BATCH], y[lo:lo + BATCH], ids=ids[lo:lo + BATCH])
        ingest_s = time.perf_counter() - t0
        res = mem.query(q, k=K)
        batch_s = timed(lambda: mem.query(q, k=K), 3)
        lat = []
        for i in range(singles):
            t0 = time.perf_counter()
            mem.query(q[i % len(q)], k=K)
            lat.append(time.perf_counter() - t0)
        # each shard answering the batch alone, then the merge on the driver
        per_shard = []
        for actor in mem.actors:
            per_shard.append(timed(lambda: ray.get(actor.retrieve.remote(q, K)), 3))
        parts = [ray.get(a.retrieve.remote(q, K)) for a in mem.actors]
        merge_s = timed(lambda: merge(parts, K, K, T), 3)
        rpc_s = max(0.0, batch_s - sum(per_shard) - merge_s)  # on a shared box the shards run one by one
        recall = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(res.ids, ref.ids)])
        stats = mem.stats()
        rows.append({
            "shards": n, "slots": slots, "index": stats.index, "nprobe": stats.nprobe,
            "ingest_s": ingest_s, "ingest_slots_per_s": slots / ingest_s,
            "batch_s": batch_s, "batch_qps": len(q) / batch_s,
            "single_p50_ms": float(np.percentile(lat, 50) * 1e3), "single_p99_ms": float(np.percentile(lat, 99) * 1e3),
            "argmax_agreement": float(np.mean(res.labels == ref.labels)), "recall_mean": float(recall),
            "bytes_per_slot": stats.bytes_total / stats.slots,
            "per_shard_batch_s": per_shard, "merge_s": merge_s, "merge_us_per_query": merge_s / len(q) * 1e6,
            "rpc_s": rpc_s,
            "projected_qps_one_shard_a_machine": len(q) / (max(per_shard) + merge_s + rpc_s),
        })
        mem.close()
    return {"exact_batch_s": exact_s, "rows": rows}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]["rows"]
    n = [r["shards"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(n, [r["batch_qps"] for r in rows], "o-", label="measured here (shards share 2 cores)")
    axes[0].plot(n, [r["projected_qps_one_shard_a_machine"] for r in rows], "s--",
                 label="projection: one shard a machine")
    for r in rows:
        axes[0].annotate(f"{r['index']}, nprobe {r['nprobe']}", (r["shards"], r["batch_qps"]), fontsize=7,
                         textcoords="offset points", xytext=(4, 6))
    axes[0].set_ylabel("queries / s (1,000 a call, k=64)")
    axes[0].legend(fontsize=8, loc="center right")
    width = 0.8 / max(n)
    for j, r in enumerate(rows):
        for s, t in enumerate(r["per_shard_batch_s"]):
            axes[1].bar(r["shards"] + (s - (r["shards"] - 1) / 2) * width, t * 1e3, width, color=f"C{s}")
        axes[1].plot([r["shards"] - 0.4, r["shards"] + 0.4], [r["merge_s"] * 1e3] * 2, "k-", lw=2)
    axes[1].set_ylabel("ms for the 1,000-query batch")
    axes[1].set_title("each shard alone (bars) and the merge (black line)", fontsize=9)
    axes[2].bar([str(v) for v in n], [r["ingest_slots_per_s"] for r in rows])
    axes[2].set_ylabel("ingest slots / s")
    for ax in axes:
        ax.set_xlabel("shards")
        ax.grid(True, alpha=0.3)
    agree = ", ".join(f"{r['shards']}: {r['argmax_agreement']:.3f}" for r in rows)
    fig.suptitle(f"ShardedMemory on Ray, {rows[0]['slots']:,} {report['meta']['data']} slots, d=64 "
                 f"(argmax agreement with one exact "
                 f"memory, by shards: {agree})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=4_000_000)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--singles", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="learned-like", help="one of engine.data.synthetic.DISTRIBUTIONS")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = ray.is_initialized()
    if not started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(args.slots, args.shards, args.queries, args.singles, args.seed, Path(tmp), args.data)
    finally:
        if not started:
            ray.shutdown()
    report = {"meta": {"machine": platform.platform(), "slots": args.slots, "dim": 64, "k": K, "temperature": T,
                       "queries": args.queries, "data": args.data}, "results": results}
    (args.out / "shards.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "shards.png")
    for r in results["rows"]:
        print(f"{r['shards']} shards: ingest {r['ingest_slots_per_s']:,.0f} slots/s, {r['batch_qps']:,.0f} q/s, "
              f"single p50 {r['single_p50_ms']:.2f} ms p99 {r['single_p99_ms']:.2f} ms, agreement "
              f"{r['argmax_agreement']:.4f}, recall {r['recall_mean']:.3f}, {r['bytes_per_slot']:.0f} B/slot, "
              f"merge {r['merge_us_per_query']:.1f} us/query, "
              f"projected {r['projected_qps_one_shard_a_machine']:,.0f} q/s")
    return report


if __name__ == "__main__":
    main()
