"""Serving over Arrow Flight: the client mirrors Memory, bad input over the wire, restarts and kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as fl
import pytest

import engine
from engine import Client, Memory
from engine.serve import MemoryServer, wire

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret"


@pytest.fixture
def data():
    rng = np.random.default_rng(5)
    return rng.standard_normal((400, 16)).astype(np.float32), rng.integers(0, 7, 400), rng.standard_normal((30, 16))


@pytest.fixture
def served(tmp_path):
    mem = Memory(16, index="Flat", temperature=0.2, path=tmp_path / "m")
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0", token=TOKEN, open_reads=True, max_rows=500, chunk_rows=64)
    yield server, mem
    server.shutdown()
    mem.close()


def client(server, **kw):
    return Client(f"grpc://127.0.0.1:{server.port}", "m", **kw)


def same_result(a, b):
    assert a.classes.tolist() == b.classes.tolist()
    np.testing.assert_array_equal(a.ids, b.ids)
    assert list(a.labels) == list(b.labels)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-12)
    np.testing.assert_allclose(a.tail_bound, b.tail_bound, atol=1e-12)
    assert (a.k, a.k_requested, a.exact_bound) == (b.k, b.k_requested, b.exact_bound)


def test_client_mirrors_the_embedded_memory(served, data):
    server, _ = served
    x, y, q = data
    c = client(server, token=TOKEN)
    local = Memory(16, index="Flat", temperature=0.2)
    assert c.add(x, y).tolist() == local.add(x, y).tolist()
    c.add(x[:3], [1, 2, 3], ids=[1000, 1001, 1002], weights=[2.0, 1.0, 3.0])
    local.add(x[:3], [1, 2, 3], ids=[1000, 1001, 1002], weights=[2.0, 1.0, 3.0])
    same_result(c.query(q, k=10), local.query(q, k=10))
    same_result(c.query(q, k=5, tail=1e-3), local.query(q, k=5, tail=1e-3))
    assert c.remove([0, 5, 1000]) == local.remove([0, 5, 1000]) == 3
    same_result(c.query(q, k=1000), local.query(q, k=1000))
    got, want = c.get([1001, 3]), local.get([1001, 3])
    assert got.labels == want.labels
    np.testing.assert_array_equal(got.vectors, want.vectors)
    assert len(c) == len(local) == 400
    assert c.stats().tombstones == 3
    out = c.compact()
    assert (out.slots, out.dropped, out.policy) == (400, 3, None)
    assert c.stats().tombstones == 0
    merged = c.compact(budget=50, policy="merge")  # compaction policies pass through the wire
    local.compact(budget=50, policy="merge")
    assert merged.slots == len(local) <= 50 and merged.merged_away == 350
    same_result(c.query(q, k=10), local.query(q, k=10))
    assert c.health() == {"status": "ok", "memories": ["m"]}


def test_large_batches_stream_in_chunks(served, data):
    server, mem = served
    x, y, _ = data
    c = client(server, token=TOKEN, chunk_rows=100)
    c.add(x, y)  # 400 rows in four batches of one request
    q = np.random.default_rng(1).standard_normal((450, 16))
    res = c.query(q, k=8)  # server answers in chunks of 64 rows
    same_result(res, mem.query(q, k=8))


def state(mem, q):
    res = mem.query(q, k=20)
    return len(mem), res.ids.tolist(), res.probs.round(12).tolist()


def raw(server):
    return fl.connect(f"grpc://127.0.0.1:{server.port}")


def put(server, table, command, token=TOKEN):
    options = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
    writer, reader = raw(server).do_put(fl.FlightDescriptor.for_command(command), table.schema, options)
    writer.write_table(table)
    writer.done_writing()
    reader.read()
    writer.close()


def test_bad_input_over_the_wire(served, data):
    server, mem = served
    x, y, q = data
    good = client(server, token=TOKEN)
    good.add(x, y)
    before = state(mem, q)
    anonymous, wrong = client(server), client(server, token="nope")
    cases = [
        (lambda: good.add(np.ones((2, 9)), [1, 2]), engine.DimensionError, "shape"),
        (lambda: good.add(np.full((1, 16), np.nan), [1]), ValueError, "NaN"),
        (lambda: good.query(np.ones((1, 9))), engine.DimensionError, "shape"),
        (lambda: good.remove([123456]), engine.UnknownIdError, "unknown ids"),
        (lambda: good.add(x[:1], [1], ids=[3]), engine.DuplicateIdError, "already"),
        (lambda: Client(f"grpc://127.0.0.1:{server.port}", "other", token=TOKEN).stats(),
         engine.UnknownMemoryError, "other"),
        (lambda: anonymous.add(x[:1], [1]), engine.AuthenticationError, "token"),
        (lambda: wrong.remove([1]), engine.AuthenticationError, "token"),
        (lambda: wrong.compact(), engine.AuthenticationError, "token"),
        (lambda: good.add(np.ones((501, 16)), [1] * 501), ValueError, "max_rows"),
        (lambda: good.query(np.ones((501, 16))), ValueError, "max_rows"),
        (lambda: put(server, pa.table({"label": [1]}), b'{"memory": "m"}'), fl.FlightServerError, "vector"),
        (lambda: put(server, pa.table({"vector": [[1.0] * 16]}), b'{"memory": "m"}'), fl.FlightServerError, "label"),
        (lambda: put(server, pa.table({"vector": ["a"], "label": [1]}), b'{"memory": "m"}'),
         fl.FlightServerError, "list"),
        (lambda: put(server, pa.table({"vector": [[1.0] * 16], "label": [1]}), b"not json"),
         fl.FlightServerError, "malformed"),
        (lambda: raw(server).do_get(fl.Ticket(b"\x00garbage")).read_all(), fl.FlightServerError, "malformed ticket"),
        (lambda: raw(server).do_get(fl.Ticket(b'{"memory": "m", "ids": 5}')).read_all(), fl.FlightServerError, "ids"),
        (lambda: list(raw(server).do_action(fl.Action("explode", b"{}"))), fl.FlightServerError, "unknown action"),
    ]
    for call, exc, text in cases:
        with pytest.raises(exc, match=text):
            call()
        assert state(mem, q) == before
    assert anonymous.query(q[:2], k=3).k == 3  # reads stay open with open_reads
    assert good.health()["status"] == "ok"  # still serving


def action(server, kind: str, body: bytes):
    options = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())])
    return list(raw(server).do_action(fl.Action(kind, body), options))


def exchange(server, command: bytes, queries: np.ndarray):
    writer, reader = raw(server).do_exchange(fl.FlightDescriptor.for_command(command))
    batch = pa.record_batch([pa.FixedSizeListArray.from_arrays(pa.array(queries.reshape(-1), pa.float32()), 16)],
                            names=["vector"])
    writer.begin(batch.schema)
    writer.write_batch(batch)
    writer.done_writing()
    return reader.read_all()


def test_request_fields_are_checked_by_type_not_coerced(served, data):
    server, mem = served
    x, y, q = data
    client(server, token=TOKEN).add(x[:50], y[:50])
    before = state(mem, q)
    row = pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(x[50], pa.float32()), 16), "label": [1]})
    cases = [
        (lambda: raw(server).do_get(fl.Ticket(b'{"memory": "m", "ids": [1.0]}')).read_all(), "ids"),
        (lambda: raw(server).do_get(fl.Ticket(b'{"memory": "m", "ids": ["1"]}')).read_all(), "ids"),
        (lambda: raw(server).do_get(fl.Ticket(b'{"memory": "m", "ids": [true]}')).read_all(), "ids"),
        (lambda: put(server, row, b'{"memory": "m", "upsert": "false"}'), "upsert"),
        (lambda: put(server, row, b'{"memory": "m", "op": "delete"}'), "op"),
        (lambda: put(server, row, b'{"memory": "m", "opp": "add"}'), "unknown fields"),
        (lambda: put(server, row, b'{"memory": ["m"]}'), "memory"),
        (lambda: put(server, row.append_column("id", pa.array([7.0])), b'{"memory": "m"}'), "'id' must be"),
        (lambda: put(server, row.append_column("id", pa.array(["7"])), b'{"memory": "m"}'), "'id' must be"),
        (lambda: put(server, row.set_column(1, "label", pa.array([1.5])), b'{"memory": "m"}'), "'label' must be"),
        (lambda: put(server, row.append_column("weight", pa.array(["2"])), b'{"memory": "m"}'), "'weight' must be"),
        (lambda: exchange(server, b'{"memory": "m", "k": "5"}', q[:1]), "'k'"),
        (lambda: exchange(server, b'{"memory": "m", "k": 5.0}', q[:1]), "'k'"),
        (lambda: exchange(server, b'{"memory": "m", "probs": "every"}', q[:1]), "'probs'"),
        (lambda: exchange(server, b'{"memory": "m", "probs": 1}', q[:1]), "'probs'"),
        (lambda: exchange(server, b'{"memory": "m", "op": "add"}', q[:1]), "'op'"),
        (lambda: action(server, "remove", b'{"memory": "m"}'), "give 'ids' or 'labels'"),
        (lambda: action(server, "remove", b'{"memory": "m", "ids": [1.0]}'), "ids"),
        (lambda: action(server, "remove", b'{"memory": "m", "ids": "1"}'), "ids"),
        (lambda: action(server, "compact", b'{"memory": "m", "budget": 10, "temperture": 3}'), "unknown fields"),
        (lambda: action(server, "compact", b'{"memory": "m", "budget": 10, "seed": "1"}'), "seed"),
    ]
    for call, text in cases:
        with pytest.raises(fl.FlightServerError, match=text):
            call()
        assert state(mem, q) == before
    assert action(server, "remove", b'{"memory": "m", "ids": []}')  # nothing to remove: a no-op


def test_error_messages_carry_no_server_paths(served, data, tmp_path):
    server, mem = served
    x, y, _ = data
    good = client(server, token=TOKEN)
    good.add(x[:5], y[:5])
    mem.close()  # its writes are now refused, with a message that names its directory
    with pytest.raises(engine.MemoryFailedError) as info:
        good.add(x[5:6], y[5:6])
    assert str(tmp_path) not in str(info.value) and "<path>" in str(info.value)


def test_remove_without_ids_leaves_a_memory_the_server_can_start_on(tmp_path, data):
    x, y, _ = data
    mem = Memory(16, index="Flat", path=tmp_path / "m")
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0", token=TOKEN)
    try:
        client(server, token=TOKEN).add(x[:10], y[:10])
        with pytest.raises(fl.FlightServerError, match="ids"):
            action(server, "remove", b'{"memory": "m"}')
        assert client(server, token=TOKEN).remove([]) == 0
    finally:
        server.shutdown()
        mem.close()
    proc, location = start_server(tmp_path / "m")
    try:
        assert len(Client(location, "m")) == 10
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def start_server(path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--memory", f"m={path}", "--port", "0",
                             *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline()
    assert line.startswith("serving"), line + proc.stderr.read()
    return proc, line.split(" on ")[1].strip()


def test_end_to_end_restart_finds_the_same_answers(tmp_path, data):
    x, y, q = data
    Memory(16, index="Flat", path=tmp_path / "m").close()
    (tmp_path / "token").write_text(TOKEN + "\n")
    proc, location = start_server(tmp_path / "m", "--token-file", str(tmp_path / "token"))
    try:
        c = Client(location, "m", token=TOKEN)
        c.add(x, [f"c{v}" for v in y])
        c.remove(list(range(0, 400, 9)))
        c.compact()
        c.add(x[:5], ["new"] * 5, ids=[900, 901, 902, 903, 904])
        before = c.query(q, k=16)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert "stopped" in proc.stdout.read()
    proc, location = start_server(tmp_path / "m")
    try:
        same_result(Client(location, "m").query(q, k=16), before)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_sigkill_during_writes_loses_no_acknowledged_write(tmp_path):
    rng = np.random.default_rng(2)
    Memory(16, index="Flat", path=tmp_path / "m").close()
    acked, next_id = [], 0
    for round_ in range(3):
        proc, location = start_server(tmp_path / "m")
        c = Client(location, "m")
        killer = threading.Timer(rng.uniform(0.3, 1.0), proc.send_signal, args=(signal.SIGKILL,))
        killer.start()  # the kill lands while the client is writing
        try:
            for _ in range(100_000):
                ids = np.arange(next_id, next_id + 50)
                next_id += 50  # ids of a write in flight at the kill are never reused
                try:
                    c.add(rng.standard_normal((50, 16)), [round_] * 50, ids=ids)
                except fl.FlightError:
                    break  # the server died under this write: it was not acknowledged
                acked.extend(ids.tolist())
        finally:
            killer.join()
            proc.wait()
        with Memory.open(tmp_path / "m") as mem:
            missing = [i for i in acked if i not in mem]
            assert not missing, f"acknowledged ids lost after SIGKILL: {missing[:10]}"
    assert len(acked) > 0


@pytest.mark.skipif(not Path("/usr/bin/openssl").exists(), reason="needs the openssl command to make a certificate")
def test_tls(tmp_path, data):
    x, y, q = data
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)
    mem = Memory(16, index="Flat")
    mem.add(x, y)
    cert = (tmp_path / "cert.pem").read_bytes()
    server = MemoryServer({"m": mem}, "grpc+tls://127.0.0.1:0",
                          tls_certificates=[(cert, (tmp_path / "key.pem").read_bytes())])
    try:
        c = Client(f"grpc+tls://localhost:{server.port}", "m", tls_root_certs=cert)
        same_result(c.query(q, k=4), mem.query(q, k=4))
    finally:
        server.shutdown()


def test_concurrent_single_queries_are_batched_and_answered_as_alone(tmp_path, data):
    """Dynamic batching: many one-query requests at once take fewer FAISS calls, and each
    answer equals what the embedded memory gives that query alone (float64 attention, same ids)."""
    x, y, q = data
    mem = Memory(16, index="Flat", temperature=0.2, path=tmp_path / "m")
    mem.add(x, y)
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0", batch_wait_ms=20)
    try:
        answers, errors = {}, []

        rounds = threading.Barrier(8, timeout=60)  # eight requests at once, round after round

        def one_client(i):
            try:
                c = client(server)
                for j in range(i, i + 8 * -(-len(q) // 8), 8):
                    rounds.wait()
                    if j < len(q):
                        answers[j] = c.query(q[j], k=12)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(answers) == len(q)
        for j, res in answers.items():
            same_result(res, mem.query(q[j], k=12))
        assert server.batching_stats()["m"]["calls"] < server.batching_stats()["m"]["requests"]
        with pytest.raises(engine.DimensionError):  # a bad request fails alone
            client(server).query(np.ones((1, 9)), k=3)
    finally:
        server.shutdown()
        mem.close()


def test_a_served_memory_with_full_probs_sends_its_tail_estimate(tmp_path, data):
    x, y, q = data
    mem = Memory(16, index="Flat", temperature=0.2, probs="full")
    mem.add(x, y)
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0", token=TOKEN, open_reads=True, chunk_rows=8)
    try:
        got, want = client(server).query(q, k=10), mem.query(q, k=10)
        same_result(got, want)
        np.testing.assert_allclose(got.tail_estimate, want.tail_estimate, atol=1e-12)
        np.testing.assert_allclose(got.attention.sum(axis=1) + got.tail_estimate, 1.0, atol=1e-9)
    finally:
        server.shutdown()


def test_a_client_chooses_the_probability_mode_per_call(served, data):
    """Client.query(probs=) answers as the embedded memory does in that mode, and a bad
    mode is refused before anything is sent."""
    server, mem = served
    x, y, q = data
    mem.add(x, y)
    c = client(server)
    for probs in ("full", "top-k"):
        got, want = c.query(q, k=10, probs=probs), mem.query(q, k=10, probs=probs)
        same_result(got, want)
        assert (got.tail_estimate is None) == (probs == "top-k")
    same_result(c.query(q, k=10), mem.query(q, k=10))  # the memory's own mode, top-k
    assert c.query(q, k=10).tail_estimate is None
    with pytest.raises(engine.InvalidValueError, match="probs"):
        c.query(q, k=10, probs="all")


def test_a_failed_write_tells_a_client_what_was_written():
    """A sharded write that fails after some shards wrote carries the ids written (and the
    shards down) in ``.written``: over Flight too, as its own engine type."""
    from engine.cluster import ShardUnavailableError

    class HalfWritten(Memory):
        def add(self, vectors, labels, **kwargs):
            if len(vectors) == 3:
                raise ShardUnavailableError("shard 1 did not answer", [1], [10, 12])
            err = engine.InvalidValueError("shard 1 refused its part")
            err.written = np.array([4, 6])
            raise err

    mem = HalfWritten(4, index="Flat")
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0")
    try:
        client = Client(f"grpc://127.0.0.1:{server.port}", "m")
        with pytest.raises(engine.InvalidValueError, match="refused") as exc:
            client.add(np.ones((2, 4), np.float32), [0, 1])
        assert exc.value.written.tolist() == [4, 6]
        with pytest.raises(ShardUnavailableError) as down:
            client.add(np.ones((3, 4), np.float32), [0, 1, 2])
        assert down.value.shards == [1] and down.value.written.tolist() == [10, 12]
    finally:
        server.shutdown()


def test_served_answers_under_concurrent_writes_are_each_one_consistent_state(tmp_path, data):
    """A writer adds pairs of slots near the query while clients query: every served answer
    is exactly the embedded answer of the memory after some whole number of those writes
    (never half a pair), and each client sees them in order."""
    x, y, q = data
    mem = Memory(16, index="Flat", temperature=0.2, path=tmp_path / "m")
    mem.add(x, y, ids=np.arange(len(x)))
    probe = q[0].astype(np.float32)
    rng = np.random.default_rng(3)
    writes = [(probe + 0.02 * rng.standard_normal((2, 16)).astype(np.float32), [100 + i, 100 + i],
               [10_000 + 2 * i, 10_001 + 2 * i]) for i in range(40)]
    reference = Memory(16, index="Flat", temperature=0.2)  # the same writes, one answer per prefix
    reference.add(x, y, ids=np.arange(len(x)))
    expected = [reference.query(probe, k=12)]
    base = len(reference.classes())
    for v, labels, ids in writes:
        reference.add(v, labels, ids=ids)
        expected.append(reference.query(probe, k=12))
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0")
    try:
        seen, errors, done = [[] for _ in range(4)], [], threading.Event()

        def reader(i):
            try:
                c = client(server)
                while not done.is_set():
                    res = c.query(probe, k=12)
                    j = len(res.classes) - base  # each write adds a class: how many this answer saw
                    assert 0 <= j <= len(writes), res.classes.tolist()
                    same_result(res, expected[j])  # that state's answer exactly, both slots of each pair
                    seen[i].append(j)
            except Exception as exc:  # reported below
                errors.append(exc)
                done.set()

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        writer = client(server)
        for v, labels, ids in writes:
            writer.add(v, labels, ids=ids)
        done.set()
        for t in threads:
            t.join()
        assert errors == [], errors[0]
        assert all(s == sorted(s) for s in seen) and max(max(s) for s in seen) <= len(writes)
        assert len({j for s in seen for j in s}) > 1  # the readers did see the writes land
    finally:
        server.shutdown()
        mem.close()


class _Slow:
    """A memory whose queries take a while: a server over it gets overloaded."""

    def __init__(self, mem, seconds):
        self.mem, self.seconds, self.dim, self.temperature = mem, seconds, mem.dim, mem.temperature

    def query(self, *args, **kwargs):
        import time

        time.sleep(self.seconds)
        return self.mem.query(*args, **kwargs)

    def close(self):
        self.mem.close()


def test_an_overloaded_server_says_busy_at_once_and_recovers(data):
    x, y, q = data
    mem = Memory(16, index="Flat", temperature=0.2)
    mem.add(x, y)
    server = MemoryServer({"m": _Slow(mem, 0.05)}, "grpc://127.0.0.1:0", max_queue=4)
    try:
        outcomes, lock = [], threading.Lock()

        def one(i):
            import time

            c = client(server)
            t0 = time.perf_counter()
            try:
                c.query(q[i % len(q)], k=5)
                kind = "answered"
            except engine.ServerBusyError as exc:
                assert "busy" in str(exc)
                kind = "busy"
            with lock:
                outcomes.append((kind, time.perf_counter() - t0))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy = [s for kind, s in outcomes if kind == "busy"]
        assert busy and len(busy) < 24 and max(busy) < 1.0  # refused at once, not queued without bound
        assert server.batching_stats()["m"]["busy"] == len(busy)
        assert client(server).query(q[0], k=5).ids.shape == (1, 5)  # and it answers again
        assert client(server).metrics()["batching"]["m"]["queued"] == 0
    finally:
        server.shutdown()


def test_only_a_writer_may_reset_the_metrics(served, data):
    server, _ = served  # reads are open, writes need the token
    anonymous = client(server)
    assert anonymous.metrics()["requests"] is not None
    with pytest.raises(engine.AuthenticationError):
        anonymous.metrics(reset=True)
    client(server, token=TOKEN).metrics(reset=True)


def test_metrics_count_what_was_sent(tmp_path, data):
    x, y, q = data
    mem = Memory(16, index="Flat", temperature=0.2, path=tmp_path / "m")
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0", max_rows=500)
    try:
        c = client(server)
        c.metrics(reset=True)
        for i in range(3):
            c.add(x[100 * i:100 * (i + 1)], y[100 * i:100 * (i + 1)])
        for i in range(7):
            c.query(q[i], k=5)  # small: one action each way
        c.query(np.tile(q, (10, 1)), k=5)  # 300 rows: the streamed exchange
        with pytest.raises(engine.DimensionError):
            c.query(np.ones((1, 9)), k=5)
        c.get([1, 2])
        m = c.metrics(reset=True)
        assert m["requests"] == {"add": 3, "query": 9, "get": 1, "metrics": 1}
        assert m["errors"] == {"query": 1}
        assert m["latency_ms"]["add"]["count"] == 3 and m["latency_ms"]["query"]["count"] == 9
        for stage in ("parse", "wait", "query", "encode"):  # the small queries' stages, answered ones
            assert m["latency_ms"][f"query.{stage}"]["count"] == 7
        assert m["batching"]["m"]["requests"] == 7 and sum(m["batching"]["m"]["batch_sizes"].values()) >= 1
        again = c.metrics()
        assert again["requests"] == {"metrics": 1} and again["batching"]["m"]["requests"] == 0
        c.query(q[:300], k=5)  # too many rows for one action: the client streams them
        with pytest.raises(fl.FlightServerError, match="at most"):
            list(raw(server).do_action(fl.Action("query", wire.small_query({"memory": "m"}, np.ones((600, 16))))))
        with pytest.raises(fl.FlightServerError, match="nested"):
            list(raw(server).do_action(fl.Action("stats", b"[" * 100_000 + b"]" * 100_000)))
        with pytest.raises(engine.InvalidValueError, match="empty"):
            c.query(np.zeros((0, 16)), k=5)
        assert c.query(q[:2], k=np.int64(3)).k == 3
    finally:
        server.shutdown()
        mem.close()


def test_a_client_without_a_server_or_with_a_wrong_token_gets_engine_errors(served, data):
    import socket

    x, y, q = data
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = Client(f"grpc://127.0.0.1:{port}", "m", timeout=5)
    with pytest.raises(engine.ServerUnavailableError, match="no answer") as exc:
        nowhere.query(q[:1], k=3)
    assert isinstance(exc.value, fl.FlightUnavailableError) and "\n" not in str(exc.value)
    server, _ = served
    with pytest.raises(engine.AuthenticationError, match="token") as exc:
        client(server, token="wrong").add(x[:1], [1])
    assert isinstance(exc.value, fl.FlightUnauthenticatedError) and "grpc" not in str(exc.value).lower()
    closed = MemoryServer({"m": Memory(16, index="Flat")}, "grpc://127.0.0.1:0", token=TOKEN)  # reads need it
    try:  # a single query goes on a stream: its errors are the same engine errors
        for who, kind in ((Client(f"grpc://127.0.0.1:{port}", "m"), engine.ServerUnavailableError),
                          (client(closed, token="wrong"), engine.AuthenticationError)):
            with pytest.raises(kind) as exc:
                who.query(q[0], k=3)
            assert "\n" not in str(exc.value) and "grpc" not in str(exc.value).lower()
            who.close()
    finally:
        closed.shutdown()


def test_malformed_query_actions_are_refused_and_change_nothing(served, data):
    server, mem = served
    x, y, q = data
    client(server, token=TOKEN).add(x, y)
    good = wire.small_query({"memory": "m", "k": 3}, np.ones((2, 16), np.float32))
    head = wire.small_query({"memory": "m", "k": 3}, np.ones((0, 16), np.float32))
    bodies = {
        "too short": b"\x01",
        "runs past the body": (10_000).to_bytes(4, "little") + b"{}",
        "bytes of vectors": good[:-4],
        "not JSON": (3).to_bytes(4, "little") + b"abc",
        "'rows' and 'dim'": head,  # rows 0
        "'k' must be": wire.small_query({"memory": "m", "k": 2.5}, np.ones((1, 16), np.float32)),
        "unknown fields": wire.small_query({"memory": "m", "sneaky": 1}, np.ones((1, 16), np.float32)),
        "NaN": wire.small_query({"memory": "m"}, np.full((1, 16), np.nan, np.float32)),
        "shape": wire.small_query({"memory": "m"}, np.ones((1, 9), np.float32)),
    }
    before = mem.query(q, k=5)
    for words, body in bodies.items():
        with pytest.raises(fl.FlightServerError, match=words):
            list(raw(server).do_action(fl.Action("query", body)))
    same_result(client(server).query(q, k=5), before)  # still answering, nothing changed
    assert len(mem) == len(x)


def test_the_client_takes_torch_tensors_wherever_memory_does(served, data):
    torch = pytest.importorskip("torch")
    server, mem = served
    x, y, q = data
    with client(server, token=TOKEN) as c:
        ids = c.add(torch.tensor(x[:50], requires_grad=True) * 1.0, torch.tensor(y[:50]),
                    ids=torch.arange(50), weights=torch.linspace(1, 2, 50, dtype=torch.float64))
        assert ids.tolist() == list(range(50))
        got = c.query(torch.tensor(q[:3], dtype=torch.float32, requires_grad=True), k=5)
        want = mem.query(q[:3].astype(np.float32), k=5)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(c.get(torch.tensor([3, 4])).ids, [3, 4])
        assert c.remove(torch.tensor([0, 1])) == 2 and c.remove(labels=torch.tensor(int(y[5]))) >= 1
        for bad in (["a"], [1.9], torch.tensor([2.7]), True):  # never cut down to another slot's id
            with pytest.raises(engine.InvalidValueError, match="ids must"):
                c.remove(bad)
            with pytest.raises(engine.InvalidValueError, match="ids must"):
                c.get(bad)
        with pytest.raises(engine.InvalidValueError, match="ids must"):
            c.add(x[:1], y[:1], ids=[10.5])
        assert len(mem) == len(c.ids())


def test_small_queries_share_one_stream_a_refused_one_keeps_it_and_an_idle_client_lets_the_server_stop(data):
    """A thread's small queries go over one long-lived stream: answers equal the memory's,
    a refused query is an engine error in-band (the next one still answers), a client with
    a timeout sends actions instead, and an idle client that was never closed does not
    keep a server from stopping (its stream closes when idle)."""
    import time

    x, y, q = data
    mem = Memory(16, index="Flat", temperature=0.2)
    mem.add(x, y)
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0", open_reads=True)
    location = f"grpc://127.0.0.1:{server.port}"
    idle = Client(location, "m")
    for i in range(20):
        got, want = idle.query(q[i], k=5), mem.query(q[i].astype(np.float32), k=5)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.probs, want.probs, atol=1e-12)
    with pytest.raises(engine.DimensionError):
        idle.query(np.ones(17, np.float32))
    np.testing.assert_array_equal(idle.query(q[0], k=5).ids, mem.query(q[0].astype(np.float32), k=5).ids)
    with Client(location, "m", timeout=30) as timed:  # actions, one call each
        np.testing.assert_array_equal(timed.query(q[1], k=5).ids, mem.query(q[1].astype(np.float32), k=5).ids)
    assert server.metrics.as_dict()["requests"]["query"] == 23  # the refused one counted too
    stopper = threading.Thread(target=server.shutdown)
    t0 = time.monotonic()
    stopper.start()
    stopper.join(15)
    assert not stopper.is_alive() and time.monotonic() - t0 < 10  # `idle` was never closed
    with pytest.raises(engine.ServerUnavailableError):
        idle.query(q[0], k=5)  # its stream is gone and the server too: a clean engine error


def test_a_stopping_server_ends_busy_sessions_and_an_older_server_gets_actions(data):
    """A client querying without pause does not hold a stopping server (its session ends
    after the answer in flight; then it gets a clean engine error); a server that refuses
    sessions (an older one) is asked by actions, with the same answers."""
    import time

    x, y, q = data
    mem = Memory(16, index="Flat", temperature=0.2)
    mem.add(x, y)
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0", open_reads=True)
    busy = Client(f"grpc://127.0.0.1:{server.port}", "m")
    outcome: list = []

    def hammer():
        try:
            while True:
                busy.query(q[len(outcome) % len(q)], k=3)
        except engine.ServerUnavailableError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=hammer)
    worker.start()
    time.sleep(0.3)
    stopper = threading.Thread(target=server.shutdown)
    t0 = time.monotonic()
    stopper.start()
    stopper.join(10)
    worker.join(10)
    assert not stopper.is_alive() and time.monotonic() - t0 < 5 and outcome, "the server waited on a busy session"
    busy.close()

    class Older(MemoryServer):  # a server from before sessions: it refuses the stream
        def do_exchange(self, context, descriptor, reader, writer):
            if b"session" in (descriptor.command or b""):
                raise fl.FlightServerError("malformed descriptor: 'memory' is required")
            return super().do_exchange(context, descriptor, reader, writer)

    older = Older({"m": mem}, "grpc://127.0.0.1:0", open_reads=True)
    try:
        with Client(f"grpc://127.0.0.1:{older.port}", "m") as c:
            for i in range(3):
                np.testing.assert_array_equal(c.query(q[i], k=4).ids, mem.query(q[i].astype(np.float32), k=4).ids)
    finally:
        older.shutdown()


def test_engine_serve_stops_on_sigterm_while_a_client_queries(tmp_path, data):
    x, y, q = data
    mem = Memory(16, index="Flat", path=tmp_path / "m")
    mem.add(x, y)
    mem.close()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--memory", f"m={tmp_path / 'm'}",
                             "--port", "0", "--open-reads"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        location = line.split(" on ")[1].strip()
        c = Client(location, "m")
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    c.query(q[0], k=3)
                except engine.ServerUnavailableError:
                    return

        worker = threading.Thread(target=hammer)
        worker.start()
        import time

        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # it does not wait on the busy session
        stop.set()
        worker.join(10)
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    with Memory.open(tmp_path / "m") as again:  # closed cleanly: its lock released
        assert len(again) == len(x)
