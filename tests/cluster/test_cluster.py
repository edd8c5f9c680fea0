"""ShardedMemory on a local Ray instance: the same answers as one Memory, a certified bound,
bad input refused before any shard changes, and a killed shard losing nothing acknowledged.

References: a single in-process Memory holding the same slots (same ids), and attention
computed densely in float64 over every slot (engine.testing).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import engine  # noqa: E402
from engine import Memory  # noqa: E402
from engine.cluster import ShardedMemory, ShardUnavailableError  # noqa: E402
from engine.data import clustered  # noqa: E402
from engine.protocol import MemoryLike  # noqa: E402
from engine.testing import brute_force_topk, dense_attention, omitted_mass, total_variation  # noqa: E402

DIM, T = 32, 0.1


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def slots():
    return clustered(50_000, DIM, n_classes=200, seed=11, queries=200)


@pytest.fixture(scope="module")
def pair(slots, tmp_path_factory):
    """4 Flat shards and one Memory with the same 50k slots (the shards' ids)."""
    x, y, q, _ = slots
    sharded = ShardedMemory(DIM, shards=4, path=tmp_path_factory.mktemp("c") / "m", index="Flat", temperature=T)
    ids = sharded.add(x, y)
    single = Memory(DIM, index="Flat", temperature=T, probs="top-k")  # what a sharded memory answers
    single.add(x, y, ids=ids)
    yield sharded, single, ids
    sharded.close()


def test_four_flat_shards_answer_as_one_memory(pair, slots):
    sharded, single, ids = pair
    x, y, q, _ = slots
    assert len(np.unique(ids)) == len(ids) and len(sharded) == len(single) == len(x)
    got, want = sharded.query(q, k=64), single.query(q, k=64)
    # the same slots with the same attention; slots whose float32 scores tie may swap places
    by_id = lambda r: np.take_along_axis(r.attention, np.argsort(r.ids, axis=1), 1)  # noqa: E731
    np.testing.assert_array_equal(np.sort(got.ids, axis=1), np.sort(want.ids, axis=1))
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(by_id(got), by_id(want), rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.attention, want.attention, rtol=0, atol=1e-6)
    assert got.exact_bound and got.missing_shards == ()
    # the certificate: at least the true mass outside the top-64, from dense float64 attention
    true_omitted = omitted_mass(x, q, got.ids, temperature=T, ids=ids)
    assert (got.tail_bound >= true_omitted - 1e-12).all()
    # probabilities per label agree too (columns may differ: compare by label)
    for i in range(5):
        p_got = dict(zip(got.classes.tolist(), got.probs[i]))
        p_want = dict(zip(want.classes.tolist(), want.probs[i]))
        for label, p in p_got.items():
            assert abs(p - p_want[label]) < 1e-9


def test_routing_by_id_get_contains_remove(pair, slots):
    sharded, single, ids = pair
    x, y, q, _ = slots
    some = ids[[0, 1, 2, 3, 17, 4000]]
    got = sharded.get(some)
    np.testing.assert_array_equal(got.ids, some)
    assert got.labels == single.get(some).labels
    np.testing.assert_array_equal(got.vectors, single.get(some).vectors)
    assert int(some[0]) in sharded and -1 not in sharded and "x" not in sharded and 10**18 not in sharded
    owners = {int(i) % 4 for i in ids[:8]}
    assert owners == {0, 1, 2, 3}  # fresh slots are spread over every shard


def test_bad_input_changes_no_shard(pair, slots):
    sharded, _, ids = pair
    x, y, _, _ = slots
    before = len(sharded)
    cases = [
        (engine.DimensionError, lambda: sharded.add(x[:5, :10], y[:5])),
        (engine.InvalidValueError, lambda: sharded.add(np.full((3, DIM), np.nan), y[:3])),
        (engine.InvalidValueError, lambda: sharded.add(x[:3], ["a", "b", "c"])),  # int memory, str labels
        (engine.DuplicateIdError, lambda: sharded.add(x[:4], y[:4], ids=ids[:4])),  # on 4 different shards
        (engine.DuplicateIdError, lambda: sharded.add(x[:2], y[:2], ids=[10**12, 10**12])),
        (engine.DuplicateIdError, lambda: sharded.add(x[:3], y[:3], ids=[10**12 + 1, 10**12 + 2, int(ids[5])])),
        (engine.InvalidValueError, lambda: sharded.add(x[:3], y[:3], weights=[1.0, -1.0, 1.0])),
        (engine.UnknownIdError, lambda: sharded.remove([int(ids[0]), int(ids[1]), 10**15])),
        (engine.UnknownIdError, lambda: sharded.get([int(ids[0]), 10**15])),
        (engine.DimensionError, lambda: sharded.query(x[:2, :5])),
        (engine.InvalidValueError, lambda: sharded.query(x[:2], k=0)),
        (engine.InvalidValueError, lambda: ShardedMemory(DIM, shards=0, path="/nonexistent/never")),
        (engine.InvalidValueError, lambda: ShardedMemory(DIM, shards=2, path="/nonexistent/never", index="Nope")),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
    assert len(sharded) == before
    assert int(ids[0]) in sharded and 10**12 not in sharded and 10**12 + 1 not in sharded
    with pytest.raises(engine.MemoryExistsError):
        ShardedMemory(DIM, shards=4, path=sharded.path)


def test_every_memory_kind_speaks_the_protocol(pair):
    sharded, single, _ = pair
    assert isinstance(single, MemoryLike) and isinstance(sharded, MemoryLike)
    assert issubclass(engine.Client, MemoryLike)


def test_every_memory_kind_answers_top_k_by_default_and_full_when_asked(pair, slots):
    sharded, single, ids = pair
    x, y, q, _ = slots
    q = q[:20]
    got, want = sharded.query(q, k=16), single.query(q, k=16, probs="top-k")
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.attention, want.attention, atol=1e-9)
    assert sharded.query(q, k=16, probs="top-k").tail_estimate is None
    # full: four Flat shards' class masses add up to dense float64 attention over every slot
    full = sharded.query(q, k=16, probs="full")
    classes = np.unique(y)
    dense = dense_attention(x, y, q, temperature=T, classes=classes)
    np.testing.assert_array_equal(full.classes, classes)
    np.testing.assert_allclose(full.probs, dense, atol=1e-9)
    np.testing.assert_allclose(full.probs, single.query(q, k=16, probs="full").probs, atol=1e-9)
    assert full.exact_bound and (full.tail_bound == 0).all()
    np.testing.assert_array_equal(full.ids, single.query(q, k=16, probs="full").ids)
    with pytest.raises(engine.InvalidValueError, match="probs"):
        sharded.query(q, k=16, probs="every")


def test_ivf_shards_answer_full_attention_within_the_single_memorys_error(tmp_path):
    """IVF shards estimate their own unprobed lists; the merged answer stays as close to dense
    attention as one memory's, and its certificate covers what no shard scored."""
    x, y, q, _ = clustered(40_000, DIM, n_classes=100, seed=13, queries=100)
    sharded = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="IVF64,Flat", nprobe=8, temperature=0.05)
    ids = sharded.add(x, y)
    single = Memory(DIM, index="IVF64,Flat", nprobe=8, temperature=0.05)
    single.add(x, y, ids=ids)
    classes = np.unique(y)
    dense = dense_attention(x, y, q, temperature=0.05, classes=classes)
    got, one = sharded.query(q, k=64, probs="full"), single.query(q, k=64, probs="full")
    tv = lambda p: total_variation(p, dense)  # noqa: E731
    assert tv(got.probs).mean() <= max(2 * tv(one.probs).mean(), 0.01), (tv(got.probs).mean(), tv(one.probs).mean())
    assert (got.probs.argmax(axis=1) == dense.argmax(axis=1)).mean() >= 0.98
    # the scored mass is exact, so the answer can differ from dense attention by no more than
    # the larger of the true unscored share (which the certificate bounds) and the estimated one
    assert got.exact_bound
    assert (tv(got.probs) <= np.maximum(got.tail_bound, got.tail_estimate) + 1e-6).all()
    wide = sharded.query(q[:10], k=len(x), probs="full")  # k covers every slot: all scored
    np.testing.assert_allclose(wide.probs, dense[:10], atol=1e-7)  # float32-stored vectors at T = 0.05
    assert (wide.tail_bound == 0).all()
    sharded.close()


def test_import_engine_does_not_import_ray():
    code = "import sys, engine; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_reopen_and_compact_keep_every_class_mass(tmp_path):
    x, y = clustered(4000, DIM, n_classes=10, seed=3)
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat", temperature=T)
    ids = mem.add(x, y, weights=np.linspace(0.5, 2.0, len(x)))
    mem.remove(ids[:100])
    mem.close()
    mem = ShardedMemory.open(tmp_path / "m")
    try:
        assert len(mem) == 3900 and int(ids[0]) not in mem and int(ids[100]) in mem
        live = mem.get(ids[100:])
        mass = {c: live.weights[np.array(live.labels) == c].sum() for c in range(10)}
        report = mem.compact(budget=200, policy="merge")
        assert report.slots <= 200 and len(mem) <= 200
        after = mem.query(x[:1], k=len(mem))  # every slot
        kept = mem.get(after.ids[0][after.ids[0] >= 0])
        for c in range(10):
            got = np.array(kept.weights)[np.array(kept.labels) == c].sum()
            assert abs(got - mass[c]) <= 1e-9 * mass[c]
    finally:
        mem.close()


def _kill(actor, seconds=60.0):
    """End a shard's actor for good and wait until Ray reports it dead (ray.kill returns at once)."""
    ray.kill(actor, no_restart=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            ray.get(actor.size.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            return
        time.sleep(0.05)
    raise AssertionError("the actor is still alive")


def _until(fn, seconds=60.0):
    end = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except ShardUnavailableError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def test_a_killed_shard_comes_back_with_every_acknowledged_write(tmp_path):
    x, y = clustered(6000, DIM, n_classes=20, seed=5)
    mem = ShardedMemory(DIM, shards=3, path=tmp_path / "m", index="Flat", temperature=T)
    try:
        acked, removed = [], []
        for i in range(0, 2000, 100):
            acked.extend(mem.add(x[i:i + 100], y[i:i + 100]).tolist())
        mem.remove(acked[:50])
        removed = acked[:50]
        victim = mem.shard_pids()[1]
        os.kill(victim, signal.SIGKILL)
        outage_seen = False
        for i in range(2000, 4000, 100):  # a stream of writes through the crash
            try:
                acked.extend(mem.add(x[i:i + 100], y[i:i + 100]).tolist())
            except ShardUnavailableError as exc:
                outage_seen = True
                assert exc.shards == [1]
                acked.extend(exc.written.tolist())  # the other shards' part is acknowledged
        # during an outage a query fails naming the shard, or answers partially with a valid bound
        try:
            res = mem.query(x[:5], k=16, allow_partial=True)
            if res.missing_shards:
                outage_seen = True
                assert res.missing_shards == (1,) and not res.exact_bound and (res.tail_bound > 0).all()
        except ShardUnavailableError:
            pass
        _until(lambda: mem.query(x[:5], k=16))  # Ray restarts the shard; it reopens its directory
        assert mem.shard_pids()[1] != victim
        present = set(mem.get(np.array(sorted(set(acked) - set(removed)))).ids.tolist())
        assert present == set(acked) - set(removed)
        assert not any(int(i) in mem for i in removed)
        assert outage_seen  # a restart takes a process start and an open: the next call sees it down
    finally:
        mem.close()


def test_a_shard_that_stays_down_fails_queries_by_name_or_answers_partially(tmp_path):
    x, y, q, _ = clustered(3000, DIM, n_classes=10, seed=8, queries=30)
    mem = ShardedMemory(DIM, shards=3, path=tmp_path / "m", index="Flat", temperature=T)
    ids = mem.add(x, y, ids=np.arange(len(x)))  # ids are rows of x
    mem.query(q, k=8)  # every shard has answered once: its mass is known
    _kill(mem.actors[2])
    with pytest.raises(ShardUnavailableError, match=r"\[2\]") as exc:
        mem.query(q, k=8)
    assert exc.value.shards == [2]
    res = mem.query(q, k=8, allow_partial=True)
    assert res.missing_shards == (2,) and not res.exact_bound
    assert not (res.ids % 3 == 2).any()  # nothing from the missing shard
    # the bound covers the missing shard's slots: check against dense float64 attention
    truth = omitted_mass(x, q, res.ids, temperature=T)  # ids are rows of x
    assert (res.tail_bound >= truth - 1e-12).all() and (res.tail_bound < 1).all()
    with pytest.raises(ShardUnavailableError) as exc:  # the existence check asks the down shard first
        mem.add(x[:3], y[:3], ids=[5000, 5001, 5002])  # 5000 % 3 == 2: its shard is down
    assert len(exc.value.written) == 0 and 5001 not in mem
    with pytest.raises(ShardUnavailableError) as exc:  # upsert: no check, the live shards write
        mem.add(x[:3], y[:3], ids=[5000, 5001, 5002], upsert=True)
    assert sorted(exc.value.written.tolist()) == [5001, 5002]  # the live shards' part, acknowledged
    mem.close()
    again = ShardedMemory.open(tmp_path / "m")  # a new driver: every shard is started again
    try:
        assert set(again.get(ids).ids.tolist()) == set(ids.tolist())
        assert 5001 in again and 5002 in again and 5000 not in again
    finally:
        again.close()


def test_a_sharded_memory_served_over_flight_answers_as_itself(pair, slots):
    from engine import Client
    from engine.serve import MemoryServer

    sharded, _, ids = pair
    x, y, q, _ = slots
    server = MemoryServer({"s": sharded}, "grpc://127.0.0.1:0", batch_wait_ms=0)
    try:
        c = Client(f"grpc://127.0.0.1:{server.port}", "s")
        assert isinstance(c, MemoryLike) and len(c) == len(sharded)
        got, want = c.query(q[:20], k=32), sharded.query(q[:20], k=32)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.attention, want.attention, atol=1e-12)
        np.testing.assert_allclose(got.tail_bound, want.tail_bound, atol=1e-12)
        assert int(ids[3]) in c and 10**15 not in c
        with pytest.raises(engine.UnknownIdError):
            c.remove([10**15])
        new = c.add(x[:8], y[:8])
        assert all(int(i) in sharded for i in new) and len(sharded) == len(ids) + 8
        assert c.remove(new) == 8
        assert c.stats().slots == len(ids)
    finally:
        server.shutdown()


def test_engine_serve_cluster_serves_a_sharded_memory(tmp_path):
    from engine import Client

    x, y, q, _ = clustered(2000, DIM, n_classes=10, seed=4, queries=10)
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat", temperature=T)
    ids = mem.add(x, y)
    want = mem.query(q, k=16)
    mem.close()  # the server's own actors open the shard directories
    address = ray.get_runtime_context().gcs_address
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--cluster", address,
                               "--memory", f"s={tmp_path / 'm'}", "--port", "0", "--batch-wait-ms", "0"],
                              stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving s on "), line
        c = Client(line.split(" on ")[1].strip(), "s")
        got = c.query(q, k=16)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.attention, want.attention, atol=1e-12)
        assert len(c) == len(ids)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_ingest_parquet_vectors_and_images(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from engine.cluster.ingest import Embedder, ingest
    from engine.data.images import as_input
    from engine.nn import MatchingNetwork

    # vectors, in two files, through the CLI (creating the memory)
    x, y = clustered(3000, 8, n_classes=5, seed=6)
    for part in range(2):
        rows = slice(part * 1500, (part + 1) * 1500)
        pq.write_table(pa.table({"vector": pa.array(list(x[rows])), "label": y[rows],
                                 "id": np.arange(3000)[rows]}), tmp_path / f"v{part}.parquet")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-m", "engine.cli", "ingest", str(tmp_path / "vec"),
                          str(tmp_path / "v0.parquet"), str(tmp_path / "v1.parquet"), "--shards", "2", "--dim", "8",
                          "--index", "Flat", "--batch-size", "500", "--cluster", ray.get_runtime_context().gcs_address],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ingested 3,000 slots" in out.stdout
    # one progress bar, none of Ray Data's own logs (those are behind --verbose)
    noise = [ln for ln in out.stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("ingest")]
    assert not noise, noise
    mem = ShardedMemory.open(tmp_path / "vec")
    try:
        assert len(mem) == 3000
        got = mem.get(np.arange(0, 3000, 7))
        want = x[::7] / np.linalg.norm(x[::7], axis=1, keepdims=True)
        np.testing.assert_allclose(got.vectors, want, atol=1e-6)
        assert got.labels == y[::7].tolist()
    finally:
        mem.close()
    # images, embedded by a model's g (a fresh one: what is checked is the pipeline)
    torch.manual_seed(0)
    model = MatchingNetwork()
    model.eval()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model": model.config()}))
    torch.save(model.state_dict(), ckpt / "best.pt")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    pq.write_table(pa.table({"image": [_png(im) for im in images], "label": [f"c{i % 4}" for i in range(300)]}),
                   tmp_path / "img.parquet")
    mem = ShardedMemory(64, shards=2, path=tmp_path / "img", index="Flat")
    try:
        report = ingest(mem, [tmp_path / "img.parquet"], checkpoint=ckpt, batch_size=64, replicas=1, progress=False)
        assert report.slots == 300 and report.embedded and len(mem) == 300
        with torch.no_grad():
            ref = model.g_backbone(as_input(images)).numpy()
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        res = mem.query(ref[:10], k=1)  # each image's own embedding is its nearest slot
        assert (res.scores[:, 0] > 1 - 1e-5).all()
        assert sorted(set(res.labels.tolist())) <= ["c0", "c1", "c2", "c3"]
        with pytest.raises(engine.InvalidValueError, match="checkpoint"):
            ingest(mem, [tmp_path / "img.parquet"], progress=False)
        pq.write_table(pa.table({"image": [b"not an image"], "label": ["c0"]}), tmp_path / "bad.parquet")
        with pytest.raises(Exception, match="could not be decoded"):
            ingest(mem, [tmp_path / "bad.parquet"], checkpoint=ckpt, progress=False)
        assert len(mem) == 300
        # a model trained on 40x40 images: read at its size by default, another size refused
        ckpt40 = tmp_path / "ckpt40"
        ckpt40.mkdir()
        (ckpt40 / "config.json").write_text(json.dumps({"model": MatchingNetwork(image_size=40).config()}))
        torch.save(MatchingNetwork(image_size=40).state_dict(), ckpt40 / "best.pt")
        assert Embedder(str(ckpt40), None).size == 40 and Embedder(str(ckpt), None).size == 28
        for bad in (0, -3, 12, True, 28.0):  # refused before any row is read, whatever the checkpoint
            for which in (ckpt, ckpt40):
                with pytest.raises(engine.InvalidValueError, match="image size"):
                    Embedder(str(which), bad)
        with pytest.raises(engine.InvalidValueError, match="40x40"):
            ingest(mem, [tmp_path / "img.parquet"], checkpoint=ckpt40, image_size=28, progress=False)
        assert len(mem) == 300
    finally:
        mem.close()


def test_bad_compaction_changes_no_shard(tmp_path):
    x, y = clustered(2000, DIM, n_classes=20, seed=12)
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat", temperature=T, track_usage=False)
    try:
        mem.add(x, y)
        for call in (lambda: mem.compact(budget=30),  # 15 a shard, fewer than each shard's 20 classes
                     lambda: mem.compact(budget=100, policy="nope"),
                     lambda: mem.compact(budget=100, policy="age"),  # no usage times
                     lambda: mem.compact(budget=100, policy="distill", steps=-1),
                     lambda: mem.compact(budget=1)):
            with pytest.raises(engine.InvalidValueError):
                call()
        assert len(mem) == 2000
        mem.compact(budget=100)
        assert len(mem) <= 100
    finally:
        mem.close()


def test_an_error_raised_inside_a_shard_arrives_as_the_engine_error(tmp_path):
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat")
    try:
        with pytest.raises(engine.EmptyMemoryError):
            mem.query(np.ones((1, DIM)))
        mem.add(np.ones((3, DIM)), [1, 2, 3])
        actor = mem.actors[0]
        with pytest.raises(engine.UnknownIdError) as exc:  # straight from a shard, through Ray
            ray.get(actor.get.remote(np.array([10**9])))
        assert "unknown ids" in str(exc.value)
    finally:
        mem.close()


def test_a_memory_open_in_another_driver_is_refused_by_name(tmp_path):
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat")
    try:
        mem.add(np.ones((4, DIM)), [1, 2, 3, 4])
        with pytest.raises(ShardUnavailableError, match="could not start.*MemoryLockedError"):
            ShardedMemory.open(tmp_path / "m")
        assert len(mem) == 4  # the first driver's shards are untouched
    finally:
        mem.close()
    with pytest.raises(FileNotFoundError):
        ShardedMemory.open(tmp_path / "nothing")
    (tmp_path / "m" / "sharded.json").write_text("{not json")
    with pytest.raises(engine.CorruptFileError):
        ShardedMemory.open(tmp_path / "m")


def test_a_missing_shard_of_an_inner_product_memory_leaves_the_tail_unbounded(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, DIM)).astype(np.float32)
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat", metric="ip", temperature=1.0)
    try:
        mem.add(x, rng.integers(0, 3, 600), ids=np.arange(600))
        mem.query(x[:4], k=8)
        _kill(mem.actors[1])
        res = mem.query(x[:4], k=8, allow_partial=True)
        assert res.missing_shards == (1,) and (res.tail_bound == 1.0).all()  # no bound, said as 1
        assert np.isfinite(res.attention).all() and (res.ids % 2 == 0).all()
    finally:
        mem.close()


def test_l2_shards_answer_as_one_l2_memory_in_both_modes(tmp_path):
    """Each shard lifts the same query alike (engine.metric), so their scores merge."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((2000, DIM)) * 0.7 + rng.standard_normal((5, DIM))[rng.integers(0, 5, 2000)] * 2)
    x, y = x.astype(np.float32), rng.integers(0, 5, 2000)
    q = x[:20] + rng.normal(0, 0.3, (20, DIM)).astype(np.float32)
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat", metric="l2", temperature=4.0)
    try:
        ids = mem.add(x, y)
        single = Memory(DIM, index="Flat", metric="l2", temperature=4.0)
        single.add(x, y, ids=ids)
        for probs in ("top-k", "full"):
            got, want = mem.query(q, k=32, probs=probs), single.query(q, k=32, probs=probs)
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
        full = mem.query(q, k=32, probs="full")
        p = dense_attention(x, y, q, temperature=4.0, metric="l2", classes=full.classes)
        np.testing.assert_allclose(full.probs, p, atol=2e-5)
    finally:
        mem.close()


def test_a_budget_is_kept_shard_by_shard(tmp_path):
    x, y = clustered(1200, DIM, n_classes=8, seed=13)
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat", budget=400)
    try:
        for lo in range(0, 1200, 200):
            mem.add(x[lo:lo + 200], y[lo:lo + 200])
            assert len(mem) <= 400
        assert len(mem) >= 8
    finally:
        mem.close()


def test_an_add_a_shard_budget_cannot_hold_is_refused_before_any_shard_writes(tmp_path):
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat", budget=4)  # 2 slots a shard
    try:
        x = np.random.default_rng(3).standard_normal((6, DIM)).astype(np.float32)
        ids = np.arange(6)  # even ids to shard 0 (one class), odd ones to shard 1 (three classes)
        with pytest.raises(engine.InvalidValueError, match="shard 1 would hold 3 classes"):
            mem.add(x, [0, 0, 0, 1, 0, 2], ids=ids)
        assert len(mem) == 0  # shard 0's part was not written either
        mem.add(x[:4], [0, 0, 0, 1], ids=ids[:4])
        assert len(mem) == 4
    finally:
        mem.close()


def test_errors_from_inside_a_shard_arrive_clean_as_their_engine_type(tmp_path):
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat")
    try:
        x = np.random.default_rng(5).standard_normal((8, DIM)).astype(np.float32)
        mem.add(x, [0, 1, 2, 3, 0, 1, 2, 3], ids=np.arange(8))
        with pytest.raises(engine.EngineError) as exc:  # each shard holds 4 classes: 1 slot cannot keep them
            mem.compact(budget=2)
        text = str(exc.value)
        assert isinstance(exc.value, engine.InvalidValueError) and "budget" in text, text
        assert not any(word in text for word in ("Traceback", "pid=", "ip=", "ActorID", "ray::")), text
        assert len(mem) == 8
    finally:
        mem.close()


def test_shards_of_an_approximate_memory_find_the_merged_top_k(tmp_path):
    from engine.data.synthetic import isotropic

    x, y, q, _ = isotropic(60_000, DIM, n_classes=600, seed=21, queries=100)
    mem = ShardedMemory(DIM, shards=4, path=tmp_path / "m", index="auto", temperature=T)
    try:
        mem.add(x, y, ids=np.arange(len(x)))
        assert mem.stats().index.startswith("IVF")
        res = mem.query(q, k=64)
        truth, _ = brute_force_topk(x, q, 64)
        recall = np.mean([len(np.intersect1d(a, b)) / 64 for a, b in zip(res.ids, truth)])
        assert recall >= 0.98 and not res.exact_bound
    finally:
        mem.close()


def test_a_shard_lost_before_any_query_is_bounded_by_its_mass_not_its_count(tmp_path):
    x, y, q, _ = clustered(900, DIM, n_classes=6, seed=14, queries=20)
    mem = ShardedMemory(DIM, shards=3, path=tmp_path / "m", index="Flat", temperature=T)
    try:
        w = np.where(np.arange(900) % 3 == 2, 1e6, 1.0)  # the shard that will be lost holds heavy slots
        mem.add(x, y, ids=np.arange(900), weights=w)
        mem.close()
        mem = ShardedMemory.open(tmp_path / "m")  # a new driver: it knows the shards only from opening
        _kill(mem.actors[2])
        res = mem.query(q, k=8, allow_partial=True)
        assert res.missing_shards == (2,)
        truth = omitted_mass(x, q, res.ids, temperature=T, weights=w)  # ids are rows of x
        assert (res.tail_bound >= truth - 1e-12).all()
    finally:
        mem.close()


def test_a_partial_answer_is_bounded_by_every_mass_written_since_the_last_query(tmp_path):
    x, y, q, _ = clustered(600, DIM, n_classes=6, seed=15, queries=20)
    mem = ShardedMemory(DIM, shards=2, path=tmp_path / "m", index="Flat", temperature=T)
    try:
        mem.add(x[:300], y[:300], ids=np.arange(300))
        mem.query(q, k=8)  # the driver's view of each shard's mass, as of now
        heavy = np.arange(301, 600, 2)  # odd ids: all on shard 1, each of mass 1e8
        mem.add(x[heavy], y[heavy], ids=heavy, weights=np.full(len(heavy), 1e8))
        _kill(mem.actors[1])
        res = mem.query(q, k=8, allow_partial=True)
        assert res.missing_shards == (1,) and not res.exact_bound
        ids = np.r_[np.arange(300), heavy]
        w = np.r_[np.ones(300), np.full(len(heavy), 1e8)]
        truth = omitted_mass(np.r_[x[:300], x[heavy]], q, res.ids, temperature=T, weights=w, ids=ids)
        assert (res.tail_bound >= truth - 1e-12).all(), (res.tail_bound, truth)
    finally:
        mem.close()


def test_a_sharded_directory_that_is_not_what_it_says_is_refused_by_name(tmp_path):
    """Deleted, extra, swapped and foreign shard directories, and a root that disagrees with
    its shards, are refused at open with CorruptFileError naming the shard; none is made anew."""
    import json
    import shutil

    x, y = clustered(200, DIM, n_classes=4, seed=16)
    for name in ("a", "other"):
        mem = ShardedMemory(DIM, shards=2, path=tmp_path / name, index="Flat", temperature=T)
        mem.add(x, y)
        mem.close()

    def variant(name):
        shutil.copytree(tmp_path / "a", tmp_path / name)
        return tmp_path / name

    def refused(root, match):
        with pytest.raises(engine.CorruptFileError, match=match):
            ShardedMemory.open(root)

    b = variant("b")
    shutil.rmtree(b / "shard-001")
    refused(b, "missing")
    assert not (b / "shard-001").exists()  # open made no empty shard in its place

    c = variant("c")
    doc = json.loads((c / "sharded.json").read_text())
    (c / "sharded.json").write_text(json.dumps({**doc, "shards": 1}))
    refused(c, "unexpected")

    d = variant("d")
    (d / "shard-000").rename(d / "tmp")
    (d / "shard-001").rename(d / "shard-000")
    (d / "tmp").rename(d / "shard-001")
    refused(d, "shard-000.*shard 1 of 2")

    e = variant("e")
    shutil.rmtree(e / "shard-001")
    shutil.copytree(tmp_path / "other" / "shard-001", e / "shard-001")
    refused(e, "another sharded memory")

    f = variant("f")
    doc = json.loads((f / "sharded.json").read_text())
    doc["options"]["temperature"] = 0.5
    (f / "sharded.json").write_text(json.dumps(doc))
    refused(f, "temperature")

    with pytest.raises(engine.MemoryExistsError):
        ShardedMemory(DIM, shards=3, path=tmp_path / "a")
    # a create that died before its commit point (sharded.json) left only identities: a retry creates
    g = tmp_path / "g"
    (g / "shard-000").mkdir(parents=True)
    (g / "shard-000" / "shard.json").write_text("{}")
    (g / "shard-000" / "manifest.json").write_text("{}")  # its shard's empty memory made, never written to
    with pytest.raises(FileNotFoundError):
        ShardedMemory.open(g)
    ShardedMemory(DIM, shards=2, path=g, index="Flat", temperature=T).close()
    with ShardedMemory.open(tmp_path / "a") as mem:  # the original is untouched
        assert len(mem) == 200


def test_ingest_errors_name_their_rows_and_arrive_as_one_line(tmp_path):
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from engine.cluster.ingest import MAX_PIXELS, decode, ingest
    from engine.nn import MatchingNetwork

    x, y = clustered(400, 8, n_classes=4, seed=7)
    x[350, 2] = np.nan
    (tmp_path / "parts").mkdir()
    for i, (lo, hi) in enumerate([(0, 170), (170, 260), (260, 400)]):  # read in order of the file names
        pq.write_table(pa.table({"vector": pa.array(list(x[lo:hi])), "label": y[lo:hi]}),
                       tmp_path / "parts" / f"part-{i}.parquet", row_group_size=37)
    mem = ShardedMemory(8, shards=2, path=tmp_path / "m", index="Flat")
    try:
        with pytest.raises(engine.InvalidValueError, match=r"input rows 300-399: part-2.parquet rows 40-139.*"
                                                           r"300 rows were written"):
            ingest(mem, tmp_path / "parts", batch_size=100, progress=False)
        assert len(mem) == 300  # the rows before the batch, in the files' order
        unit = x[:300] / np.linalg.norm(x[:300], axis=1, keepdims=True)  # cosine: kept normalised
        np.testing.assert_allclose(np.sort(mem.get(mem.ids()).vectors[:, 0]), np.sort(unit[:, 0]), atol=1e-6)
    finally:
        mem.close()
    # images: undecodable bytes, and a small file that decodes to a huge image
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000 and 5000 * 5000 > MAX_PIXELS // 2
    with pytest.raises(engine.InvalidValueError, match="larger than"):
        decode(buf.getvalue(), 28, max_pixels=4096)
    torch.manual_seed(0)
    model = MatchingNetwork()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model": model.config()}))
    torch.save(model.state_dict(), ckpt / "best.pt")
    pq.write_table(pa.table({"image": [b"not an image"] * 8, "label": list(range(8))}), tmp_path / "bad.parquet")
    mem = ShardedMemory(64, shards=2, path=tmp_path / "img", index="Flat")
    try:
        with pytest.raises(engine.InvalidValueError, match="could not be decoded") as exc:
            ingest(mem, tmp_path / "bad.parquet", checkpoint=ckpt, batch_size=8, replicas=1, progress=False)
        assert len(str(exc.value).splitlines()) == 1 and "Traceback" not in str(exc.value)
        assert len(mem) == 0
    finally:
        mem.close()


def test_the_readme_scale_out_example_runs(tmp_path, monkeypatch):
    """The README's ShardedMemory example as written, on this module's local Ray, with its
    shared path and shard count made local."""
    from ..test_readme import blocks

    monkeypatch.chdir(tmp_path)
    (example,) = [b for b in blocks() if "ShardedMemory(" in b]
    code = example.replace('"/shared/mem"', repr(str(tmp_path / "mem"))).replace("shards=8", "shards=2")
    rng = np.random.default_rng(0)
    namespace = {"vectors": rng.standard_normal((500, 64)).astype("float32"), "labels": rng.integers(0, 5, 500)}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["res"].ids.shape == (5, 64)
