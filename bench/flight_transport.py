"""What one round trip costs in Arrow Flight itself, with no engine work: the floor under a
served single query.

    python bench/flight_transport.py --out runs/bench [--requests 3000]

A bare Flight server (in its own process) answers with a 64-row result batch:
- ``action``: one DoAction call per request (how ``engine.Client`` sends a small query);
- ``stream``: one long-lived DoExchange stream, a message each way per request.
For each: wall time per request (one client, sequential) and the CPU it costs the client
and the server, from /proc. Writes flight_transport.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path


def _answer():
    import numpy as np
    import pyarrow as pa

    return pa.record_batch([pa.array(np.arange(64, dtype=np.int64)), pa.array(np.ones(64, np.float32))],
                           names=["id", "score"])


def serve(port_out, ready) -> None:
    import pyarrow as pa
    import pyarrow.flight as fl

    class Bare(fl.FlightServerBase):
        def do_action(self, context, action):
            sink = pa.BufferOutputStream()
            batch = _answer()
            with pa.ipc.new_stream(sink, batch.schema) as out:
                out.write_batch(batch)
            return [fl.Result(sink.getvalue())]

        def do_exchange(self, context, descriptor, reader, writer):
            started = False
            for _ in reader:
                batch = _answer()
                if not started:
                    writer.begin(batch.schema)
                    started = True
                writer.write_batch(batch)

    server = Bare("grpc://127.0.0.1:0")
    port_out.value = server.port
    ready.set()
    server.serve()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(requests: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.flight as fl

    ctx = mp.get_context("spawn")
    port, ready = ctx.Value("i", 0), ctx.Event()
    proc = ctx.Process(target=serve, args=(port, ready), daemon=True)
    proc.start()
    ready.wait(60)
    client = fl.FlightClient(f"grpc://127.0.0.1:{port.value}")
    body = b"x" * 300  # about a single 64-d query's message
    query = pa.record_batch([pa.array(np.random.default_rng(0).random(64, dtype=np.float32))], names=["v"])
    out = {}
    try:
        def timed(name, step):
            for _ in range(min(200, requests)):
                step()
            s0, c0, t0 = _cpu_s(proc.pid), time.process_time(), time.perf_counter()
            for _ in range(requests):
                step()
            wall, client_cpu, server_cpu = time.perf_counter() - t0, time.process_time() - c0, _cpu_s(proc.pid) - s0
            out[name] = {"wall_ms": 1e3 * wall / requests, "client_cpu_ms": 1e3 * client_cpu / requests,
                         "server_cpu_ms": 1e3 * server_cpu / requests}

        timed("action", lambda: list(client.do_action(fl.Action("q", body))))
        writer, reader = client.do_exchange(fl.FlightDescriptor.for_command(b"stream"))
        writer.begin(query.schema)

        def exchange():
            writer.write_batch(query)
            reader.read_chunk()

        timed("stream", exchange)
        writer.done_writing()
    finally:
        client.close()
        proc.terminate()
        proc.join(10)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"requests": args.requests, "results": measure(args.requests)}
    (args.out / "flight_transport.json").write_text(json.dumps(report, indent=2))
    for name, r in report["results"].items():
        print(f"{name:7s} wall {r['wall_ms']:.3f} ms  client CPU {r['client_cpu_ms']:.3f} ms  "
              f"server CPU {r['server_cpu_ms']:.3f} ms")
    return report


if __name__ == "__main__":
    main()
