"""Load test of the Flight server, loopback only, bounded in time and count.

    python bench/serve_load.py --slots 1000000 --clients 1 4 16 64 --seconds 20 --out runs/bench
    python bench/serve_load.py --slots 200000 --clients 4 --seconds 20 --batch 1 --compare-batching

1. Builds a durable memory of ``--slots`` learned-like embeddings
   (``engine.data.synthetic``, seeded) in a temporary directory (or reuses
   ``--memory-dir``), with the default options (index and temperature "auto",
   top-k probabilities).
2. For each number of clients, with no writer and then with one writer adding
   ``--write-rate`` slots a second (batches of 100):
   - embedded: that many threads query the memory in process (single queries by
     default), the writer a thread of the same process;
   - served: ``engine serve`` on a free loopback port (started once); that many
     client processes send requests of ``--batch`` queries, the writer one more
     process. Every request is timed, and the server's own metrics (the Flight
     action ``metrics``: its time per request by stage, batch sizes, busy
     refusals) are read after each phase.
Reports queries/s, request latency p50/p99, errors (must be 0), the CPU a request costs the
client and server (what bounds queries/s when clients share the machine), served/embedded
throughput, and where a served request's time goes (server: parse, wait for a
batch, query, encode; the rest is transport and the client), as JSON and PNG.
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
WRITE_BATCH = 100


def build_memory(path: Path, slots: int, dim: int, index: str, seed: int) -> None:
    from engine import Memory
    from engine.data.synthetic import DISTRIBUTIONS

    x, y = DISTRIBUTIONS["learned-like"](slots, dim, seed, 0)
    mem = Memory(dim, index=index, path=path)
    step = max(1, min(100_000, slots // 10))
    for lo in tqdm(range(0, slots, step), desc=f"writing {slots:,} slots", unit="chunk"):
        mem.add(x[lo:lo + step], y[lo:lo + step])
    mem.save()
    mem.close()


def _queries(dim: int, seed: int, n: int = 4096) -> np.ndarray:
    """Fresh queries from the memory's own distribution (a class centre plus noise)."""
    from engine.data.synthetic import DISTRIBUTIONS

    return DISTRIBUTIONS["learned-like"](n, dim, 0, 0)[0] + 0.05 * np.random.default_rng(seed).standard_normal(
        (n, dim)).astype(np.float32)


def _paced(rate: float, seconds: float, step, stop: threading.Event | None = None) -> dict:
    """Call ``step()`` (writing WRITE_BATCH slots) at ``rate`` slots a second for ``seconds``."""
    written, errors, lat = 0, 0, []
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end and not (stop and stop.is_set()):
        due = start + written / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        t0 = time.perf_counter()
        try:
            step()
            written += WRITE_BATCH
            lat.append(time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - every failure counts as an error
            errors += 1
            written += WRITE_BATCH  # keep the pace
    return {"written": written - WRITE_BATCH * errors, "errors": errors, "latencies": lat}


def query_worker(location: str, memory: str, dim: int, batch: int, k: int, seconds: float, seed: int,
                 start_at: float) -> dict:
    from engine import Client

    q = _queries(dim, seed)
    client = Client(location, memory)
    client.query(q[:batch], k=k)  # connected and warm before the clock starts
    time.sleep(max(0.0, start_at - time.time()))
    lat, errors, queries, i = [], 0, 0, 0
    cpu0 = time.process_time()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        lo = (i * batch) % (len(q) - batch)
        i += 1
        t0 = time.perf_counter()
        try:
            client.query(q[lo:lo + batch], k=k)
            queries += batch
            lat.append(time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - every failure counts as an error
            errors += 1
    return {"latencies": lat, "errors": errors, "queries": queries, "cpu_s": time.process_time() - cpu0}


def write_worker(location: str, memory: str, dim: int, seconds: float, rate: float, seed: int,
                 start_at: float) -> dict:
    from engine import Client

    rng = np.random.default_rng(seed)
    client = Client(location, memory)
    time.sleep(max(0.0, start_at - time.time()))
    return _paced(rate, seconds, lambda: client.add(_queries(dim, int(rng.integers(1 << 30)), WRITE_BATCH),
                                                    rng.integers(0, 10, WRITE_BATCH)))


def _summary(lat_s: np.ndarray, queries: int, seconds: float, errors: int) -> dict:
    lat = np.asarray(lat_s) * 1e3 if len(lat_s) else np.zeros(1)
    return {"queries_per_s": queries / seconds, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": int(len(lat_s)), "errors": int(errors)}


def embedded_phase(mem, dim: int, clients: int, batch: int, k: int, seconds: float, rate: float) -> dict:
    """``clients`` threads query ``mem`` in process; a thread writes at ``rate`` slots/s if rate > 0."""
    counts, lat = [0] * clients, [[] for _ in range(clients)]
    qs = [_queries(dim, 100 + i) for i in range(clients)]

    def run(i):
        q, j = qs[i], 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            lo = (j * batch) % (len(q) - batch)
            j += 1
            t0 = time.perf_counter()
            mem.query(q[lo:lo + batch], k=k)
            lat[i].append(time.perf_counter() - t0)
            counts[i] += batch

    rng = np.random.default_rng(5)
    written: dict = {}
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    if rate > 0:
        threads.append(threading.Thread(target=lambda: written.update(_paced(
            rate, seconds, lambda: mem.add(_queries(dim, int(rng.integers(1 << 30)), WRITE_BATCH),
                                           rng.integers(0, 10, WRITE_BATCH))))))
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out = _summary(np.concatenate([np.array(v) for v in lat]), sum(counts), wall, 0)
    out["slots_written"] = written.get("written", 0)
    out["cpu_ms_per_query"] = 1e3 * (time.process_time() - cpu0) / max(sum(counts), 1)  # the writer's too
    return out


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served_phase(location: str, args, clients: int, rate: float, name: str = "load", server_pid: int = 0) -> dict:
    """``clients`` query processes (and a writer process at ``rate`` slots/s) against the server."""
    from engine import Client

    admin = Client(location, name)
    admin.metrics(reset=True)
    server_cpu0 = _cpu_s(server_pid)
    ctx = mp.get_context("spawn")
    start_at = time.time() + 2.0 + 0.3 * clients  # every process started, connected and warm first
    with ctx.Pool(clients + 1) as pool:
        writer = pool.apply_async(write_worker, (location, name, args.dim, args.seconds, rate, 999, start_at)) \
            if rate > 0 else None
        readers = [pool.apply_async(query_worker, (location, name, args.dim, args.batch, args.k, args.seconds, i,
                                                   start_at)) for i in range(clients)]
        results = [r.get(timeout=args.seconds + 300) for r in readers]
        written = writer.get(timeout=args.seconds + 300) if writer is not None else {"written": 0, "errors": 0,
                                                                                      "latencies": []}
    server_cpu = _cpu_s(server_pid) - server_cpu0  # the whole phase: the writer's requests too
    metrics = admin.metrics()
    admin.close()
    lat = np.concatenate([np.array(r["latencies"]) for r in results])
    out = _summary(lat, sum(r["queries"] for r in results), args.seconds,
                   sum(r["errors"] for r in results) + written["errors"])
    out["slots_written"] = written["written"]
    out["write_p50_ms"] = float(np.percentile(np.array(written["latencies"]) * 1e3, 50)) \
        if written["latencies"] else None
    server = metrics["latency_ms"]
    stages = {s: server.get(f"query.{s}", {}).get("mean") for s in ("parse", "wait", "query", "encode")}
    handler = server.get("query", {}).get("mean")
    out["breakdown_ms"] = {"server_handler_mean": handler, **{f"server_{s}_mean": v for s, v in stages.items()},
                           "client_mean": float(lat.mean() * 1e3) if len(lat) else None}
    if handler is not None and len(lat):
        out["breakdown_ms"]["transport_and_client_mean"] = float(lat.mean() * 1e3) - handler
    if len(lat):  # CPU a request costs, each side (on a shared machine, what bounds queries/s)
        out["breakdown_ms"]["client_cpu_per_request"] = 1e3 * sum(r["cpu_s"] for r in results) / len(lat)
        if server_pid:
            out["breakdown_ms"]["server_cpu_per_request"] = 1e3 * server_cpu / len(lat)
    out["server"] = {"query_p50_ms": server.get("query", {}).get("p50"),
                     "query_p99_ms": server.get("query", {}).get("p99"),
                     "batching": metrics["batching"].get(name, {})}
    return out


def start_server(path: Path, batching: bool, batch_wait_ms: float):
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--memory", f"load={path}",
                               "--host", "127.0.0.1", "--port", "0", "--batch-wait-ms", str(batch_wait_ms),
                               *([] if batching else ["--no-batching"])],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = server.stdout.readline()
    if not line.startswith("serving"):
        server.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return server, line.split(" on ")[1].strip()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--index", default="auto")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64],
                    help="client counts to run (processes served, threads embedded)")
    ap.add_argument("--seconds", type=float, default=20.0, help="each phase")
    ap.add_argument("--batch", type=int, default=1, help="queries per request")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--write-rate", type=float, default=1000.0, help="slots a second the writer adds (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-dir", type=Path, default=None, help="reuse (or keep) the memory here")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="the server's extra batching wait under load")
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
    writers = [0.0] + ([args.write_rate] if args.write_rate > 0 else [])
    rows = []

    from engine import Memory

    mem = Memory.open(path)
    for clients in args.clients:
        for rate in writers:
            r = embedded_phase(mem, args.dim, clients, args.batch, args.k, args.seconds, rate)
            rows.append({"mode": "embedded", "clients": clients, "write_rate": rate, **r})
            print(f"embedded  {clients:3d} threads, writer {rate:6.0f}/s: {r['queries_per_s']:8,.0f} q/s  "
                  f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms", flush=True)
    mem.close()  # the server opens the directory (with what the embedded writer added)

    modes = [("served", True)] + ([("served-unbatched", False)] if args.compare_batching else [])
    for mode, batching in modes:
        server, location = start_server(path, batching, args.batch_wait_ms)
        try:
            for clients in args.clients:
                for rate in writers:
                    r = served_phase(location, args, clients, rate, server_pid=server.pid)
                    rows.append({"mode": mode, "clients": clients, "write_rate": rate, **r})
                    b = r["breakdown_ms"]
                    print(f"{mode:9s} {clients:3d} clients, writer {rate:6.0f}/s: {r['queries_per_s']:8,.0f} q/s  "
                          f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}  "
                          f"(server {b['server_handler_mean'] or 0:.2f} ms of {b['client_mean'] or 0:.2f})",
                          flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    for r in rows:
        if r["mode"] != "embedded":
            twin = next(e for e in rows if e["mode"] == "embedded" and e["clients"] == r["clients"]
                        and e["write_rate"] == r["write_rate"])
            r["over_embedded"] = r["queries_per_s"] / twin["queries_per_s"]
    report = {"meta": {"machine": platform.platform(), "cpus": os.cpu_count(), "slots": args.slots, "dim": args.dim,
                       "index": args.index, "data": "learned-like", "seconds": args.seconds, "batch": args.batch,
                       "k": args.k, "write_rate": args.write_rate, "batch_wait_ms": args.batch_wait_ms,
                       "clients": "processes (served), threads (embedded)"},
              "results": rows}
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "serve_load.png")
    if tmp is not None:
        tmp.cleanup()
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, m = report["results"], report["meta"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"embedded": "tab:grey", "served": "tab:blue", "served-unbatched": "tab:orange"}
    for mode, colour in styles.items():
        for rate, dash in ((0.0, ":"), (m["write_rate"], "-")):
            pts = sorted((r["clients"], r) for r in rows if r["mode"] == mode and r["write_rate"] == rate)
            if not pts:
                continue
            label = f"{mode}, " + ("no writer" if rate == 0 else f"writer {rate:,.0f} slots/s")
            x = [c for c, _ in pts]
            left.plot(x, [r["queries_per_s"] for _, r in pts], dash, marker="o", color=colour, label=label)
            right.plot(x, [r["p99_ms"] for _, r in pts], dash, marker="o", color=colour, label=label)
    counts = sorted({r["clients"] for r in rows})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("clients")
    left.set_ylabel("queries / s")
    right.set_ylabel("p99 request latency (ms)")
    right.set_yscale("log")
    right.axhline(5, color="grey", lw=0.8, ls="--")
    left.legend(fontsize=7)
    fig.suptitle(f"engine serve, {m['slots']:,} slots ({m['data']}, index {m['index']}), "
                 f"{m['batch']} quer{'y' if m['batch'] == 1 else 'ies'} a request, k = {m['k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
