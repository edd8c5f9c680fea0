"""Load test of the Flight server, loopback only, bounded in time and count.

    python bench/serve_load.py --slots 1000000 --clients 8 --seconds 60 --out runs/bench
    python bench/serve_load.py --batch 1 --clients 32 --compare-batching   # single-query clients

1. Builds a durable memory of ``--slots`` clustered embeddings (engine.data.clustered,
   seeded) in a temporary directory (or reuses ``--memory-dir``).
2. Embedded baselines: ``--clients`` threads query the memory in-process for
   ``--baseline-seconds`` with the same batches; and one thread sends batches of
   1,000 queries (the batched ceiling a server could approach by coalescing).
3. Served: starts ``engine serve`` on a free loopback port; ``--clients`` client
   processes send query batches for ``--seconds`` while one more process writes
   batches of new slots. Every request is timed.
Reports queries/s, request latency p50/p99, the error count (must be 0) and the
served/embedded throughput ratio, as JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


def build_memory(path: Path, slots: int, dim: int, index: str, seed: int) -> None:
    from engine import Memory
    from engine.data import clustered

    x, y = clustered(slots, dim, n_classes=max(10, slots // 1000), seed=seed)
    mem = Memory(dim, index=index, path=path)
    step = max(1, slots // 20)
    for lo in tqdm(range(0, slots, step), desc=f"writing {slots:,} slots", unit="chunk"):
        mem.add(x[lo : lo + step], y[lo : lo + step])
    mem.save()
    mem.close()


def query_worker(location: str, memory: str, dim: int, batch: int, k: int, seconds: float, seed: int) -> dict:
    from engine import Client

    rng = np.random.default_rng(seed)
    client = Client(location, memory)
    lat, errors, queries = [], 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        q = rng.standard_normal((batch, dim)).astype(np.float32)
        t0 = time.perf_counter()
        try:
            client.query(q, k=k)
            queries += batch
            lat.append(time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - every failure counts as an error
            errors += 1
    return {"latencies": lat, "errors": errors, "queries": queries}


def write_worker(location: str, memory: str, dim: int, seconds: float, seed: int) -> dict:
    from engine import Client

    rng = np.random.default_rng(seed)
    client = Client(location, memory)
    written, errors, lat = 0, 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            client.add(rng.standard_normal((100, dim)).astype(np.float32), rng.integers(0, 10, 100))
            written += 100
            lat.append(time.perf_counter() - t0)
        except Exception:  # noqa: BLE001
            errors += 1
    return {"written": written, "errors": errors, "latencies": lat}


def embedded_baseline(path: Path, dim: int, clients: int, batch: int, k: int, seconds: float) -> dict:
    from engine import Memory

    mem = Memory.open(path)
    counts, lat = [0] * clients, [[] for _ in range(clients)]

    def run(i):
        rng = np.random.default_rng(100 + i)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            q = rng.standard_normal((batch, dim)).astype(np.float32)
            t0 = time.perf_counter()
            mem.query(q, k=k)
            lat[i].append(time.perf_counter() - t0)
            counts[i] += batch

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = np.concatenate([np.array(v) for v in lat]) * 1e3
    out = {"queries_per_s": sum(counts) / wall, "p50_ms": float(np.percentile(all_lat, 50)),
           "p99_ms": float(np.percentile(all_lat, 99))}
    # the batched ceiling: one caller, 1,000 queries a call
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1000, dim)).astype(np.float32)
    done, end, t0 = 0, time.monotonic() + seconds / 2, time.perf_counter()
    while time.monotonic() < end:
        mem.query(q, k=k)
        done += len(q)
    out["batched_queries_per_s"] = done / (time.perf_counter() - t0)
    mem.close()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--index", default="auto")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--baseline-seconds", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=100, help="queries per request")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-dir", type=Path, default=None, help="reuse (or keep) the memory here")
    ap.add_argument("--batch-wait-ms", type=float, default=1.0, help="the server's dynamic batching window")
    ap.add_argument("--compare-batching", action="store_true",
                    help="serve a second time with dynamic batching off, and report both")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    tmp = None
    path = args.memory_dir
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "load"
    if not (path / "manifest.json").exists():
        build_memory(path, args.slots, args.dim, args.index, args.seed)

    print("embedded baseline ...", flush=True)
    embedded = embedded_baseline(path, args.dim, args.clients, args.batch, args.k, args.baseline_seconds)

    served, written = served_phase(path, args, args.batch_wait_ms)
    unbatched = served_phase(path, args, 0.0)[0] if args.compare_batching else None
    report = {
        "meta": {"machine": platform.platform(), "cpus": os.cpu_count(), "slots": args.slots, "dim": args.dim,
                 "index": args.index, "clients": args.clients, "seconds": args.seconds, "batch": args.batch, "k": args.k,
                 "batch_wait_ms": args.batch_wait_ms},
        "served": served,
        "embedded": embedded,
    }
    if unbatched is not None:
        report["served_unbatched"] = unbatched
    report["served_over_embedded_throughput"] = served["queries_per_s"] / embedded["queries_per_s"]
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "serve_load.png")
    s, e = report["served"], report["embedded"]
    print(f"served   {s['queries_per_s']:,.0f} q/s  p50 {s['p50_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms  "
          f"errors {s['errors']}  slots written {s['slots_written']:,}")
    if unbatched is not None:
        u = unbatched
        print(f"unbatched {u['queries_per_s']:,.0f} q/s  p50 {u['p50_ms']:.1f} ms  p99 {u['p99_ms']:.1f} ms  "
              f"errors {u['errors']}")
    print(f"embedded {e['queries_per_s']:,.0f} q/s  p50 {e['p50_ms']:.1f} ms  p99 {e['p99_ms']:.1f} ms  "
          f"(batched 1,000 a call: {e['batched_queries_per_s']:,.0f} q/s)")
    print(f"served / embedded throughput: {report['served_over_embedded_throughput']:.2f}")
    if tmp is not None:
        tmp.cleanup()
    return report


def served_phase(path: Path, args, batch_wait_ms: float) -> tuple[dict, dict]:
    """Serve the memory; ``--clients`` query processes and one writer for ``--seconds``."""
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--memory", f"load={path}",
                               "--host", "127.0.0.1", "--port", "0", "--batch-wait-ms", str(batch_wait_ms)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = server.stdout.readline()
    if not line.startswith("serving"):
        raise RuntimeError(f"server did not start: {line!r}")
    location = line.split(" on ")[1].strip()
    print(f"served (batching window {batch_wait_ms:g} ms): {args.clients} query clients + 1 writer for "
          f"{args.seconds:.0f} s at {location}", flush=True)
    ctx = mp.get_context("spawn")
    try:
        with ctx.Pool(args.clients + 1) as pool:
            writer = pool.apply_async(write_worker, (location, "load", args.dim, args.seconds, 999))
            readers = [pool.apply_async(query_worker, (location, "load", args.dim, args.batch, args.k, args.seconds, i))
                       for i in range(args.clients)]
            results = [r.get(timeout=args.seconds + 300) for r in readers]
            written = writer.get(timeout=args.seconds + 300)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    lat = np.concatenate([np.array(r["latencies"]) for r in results]) * 1e3 if results else np.zeros(1)
    served = {"queries_per_s": sum(r["queries"] for r in results) / args.seconds,
              "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
              "requests": int(len(lat)), "errors": int(sum(r["errors"] for r in results) + written["errors"]),
              "slots_written": written["written"], "batch_wait_ms": batch_wait_ms,
              "write_p50_ms": float(np.percentile(np.array(written["latencies"]) * 1e3, 50))
              if written["latencies"] else None}
    return served, written


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, e, m = report["served"], report["embedded"], report["meta"]
    runs = [("embedded", e), ("served (Flight)", s)]
    if "served_unbatched" in report:
        runs = [("embedded", e), ("served, batched", s), ("served, unbatched", report["served_unbatched"])]
    ceiling = e.get("batched_queries_per_s")
    names, qps = [n for n, _ in runs], [r["queries_per_s"] for _, r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10 + 2 * (len(runs) - 2), 3.8))
    bars = axes[0].bar(names, qps, color=["#999999", "#1f77b4", "#ff7f0e"][: len(runs)])
    axes[0].bar_label(bars, labels=[f"{v:,.0f}" for v in qps])
    axes[0].set_ylabel("queries / s")
    axes[0].set_ylim(0, 1.12 * max(qps))  # room for the labels
    axes[0].set_title(f"{m['clients']} clients, {m['batch']} quer{'y' if m['batch'] == 1 else 'ies'} a request, "
                      f"k={m['k']}" + (f"\n(embedded, 1,000 queries a call: {ceiling:,.0f} q/s)" if ceiling else ""),
                      fontsize=9)
    x = np.arange(len(runs))
    axes[1].bar(x - 0.2, [r["p50_ms"] for _, r in runs], 0.4, label="p50")
    axes[1].bar(x + 0.2, [r["p99_ms"] for _, r in runs], 0.4, label="p99")
    axes[1].set_xticks(x, names)
    axes[1].set_ylabel("request latency (ms)")
    axes[1].set_title(f"errors: {s['errors']}; {s['slots_written']:,} slots written meanwhile", fontsize=9)
    axes[1].legend()
    fig.suptitle(f"engine serve load test: {m['slots']:,} slots, d={m['dim']}, index {m['index']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
