"""Per-slot metadata pays only for what is used; a codes-only memory keeps codes on disk too.

References are independent of the code under test: a Python dict of the slots written
(ids, labels, weights), and search results before a reopen compared with after it.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

import engine
from engine import Memory, store
from engine.testing import brute_force_topk

DIM = 16


def data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM))
    y = rng.integers(0, 20, n)
    return (centres[y] + 0.5 * rng.standard_normal((n, DIM))).astype(np.float32), y


def snapshot_of(path):
    doc = json.loads((path / "manifest.json").read_text())
    return path / doc["snapshot"]["file"]


def test_metadata_bytes_follow_what_is_used():
    x, y = data(4000)
    lean = Memory(DIM, index="Flat", track_usage=False)
    lean.add(x, y)
    full = Memory(DIM, index="Flat", policy="age")  # the age policy keeps usage times
    full.add(x, y, weights=np.full(len(x), 2.0))
    per_slot = lambda m: m.stats().bytes_ids / len(m)  # noqa: E731
    # ids 8, label index 4, tombstone 1 (growth slack aside); + weight 8 + usage 8
    assert 13 <= per_slot(lean) < 13 * 1.5
    assert per_slot(full) - per_slot(lean) >= 16
    full.add(x[:10], y[:10], ids=np.arange(10**6, 10**6 - 10, -1))  # descending ids: a map is needed
    assert per_slot(full) >= 13 + 16 + 16 * len(x) / len(full)


def test_ids_out_of_order_upserts_and_removes_match_a_dict():
    rng = np.random.default_rng(3)
    x, y = data(3000, seed=3)
    mem = Memory(DIM, index="Flat", track_usage=False)
    ref: dict[int, int] = {}
    for step in range(30):
        n = int(rng.integers(1, 200))
        ids = rng.choice(5000, n, replace=False) if step % 3 else None
        rows = rng.integers(0, len(x), n)
        got = mem.add(x[rows], y[rows], ids=ids, upsert=True)
        ref.update(zip(got.tolist(), y[rows].tolist()))
        if step % 4 == 3:
            drop = rng.choice(sorted(ref), min(len(ref), 50), replace=False)
            mem.remove(drop)
            for i in drop.tolist():
                ref.pop(i)
        assert mem.ids().tolist() == sorted(ref)
        probe = rng.integers(0, 6000, 100)
        assert [int(i) in mem for i in probe] == [int(i) in ref for i in probe]
        some = np.array(sorted(ref))[:: max(1, len(ref) // 50)]
        assert mem.get(some).labels == [ref[i] for i in some.tolist()]


def test_age_policy_needs_usage_times(tmp_path):
    with pytest.raises(engine.InvalidValueError, match="track_usage"):
        Memory(DIM, track_usage=False, policy="age")
    mem = Memory(DIM, track_usage=False, path=tmp_path / "m")
    x, y = data(200)
    mem.add(x, y)
    with pytest.raises(engine.InvalidValueError, match="track_usage"):
        mem.compact(budget=50, policy="age")
    assert len(mem) == 200
    with pytest.raises(engine.InvalidValueError, match="track_usage"):
        Memory(DIM, track_usage="no")
    mem.close()
    again = Memory.open(tmp_path / "m")
    assert again.stats().bytes_ids / len(again) < 13 * 1.5  # the setting survives a reopen
    again.compact(budget=50, policy="merge")
    assert len(again) <= 50
    again.close()


@pytest.fixture(scope="module")
def codes_memory(tmp_path_factory):
    """A trained IVF-PQ memory without rescoring, with removals, upserts and weights."""
    path = tmp_path_factory.mktemp("pq") / "m"
    x, y = data(12_000, seed=1)
    mem = Memory(DIM, index="IVF16,PQ4", rescore=False, path=path, track_usage=False)
    mem.add(x, y)
    mem.remove(np.arange(0, 12_000, 7))
    mem.add(x[:100] + 0.01, y[:100], ids=np.arange(1, 101), upsert=True, weights=np.full(100, 3.0))
    return mem, path, x


def test_a_codes_only_memory_snapshots_its_codes_and_reopens_identical(codes_memory):
    mem, path, x = codes_memory
    assert mem.stats().lossy
    q = x[5000:5200]
    ids_before = mem.ids()
    mem.save()
    table = pa.ipc.open_file(snapshot_of(path)).read_all()
    assert table.schema.names == ["id", "label", "weight", "code"]  # weights are not all 1; no usage
    assert pa.types.is_dictionary(table.schema.field("label").type)
    per_slot = snapshot_of(path).stat().st_size / len(mem)
    assert per_slot < 0.5 * 4 * DIM  # codes (1 + 4 bytes) instead of 64-byte vectors
    mem.add(x[:50], np.zeros(50, np.int64))  # logged after the snapshot: replayed on top of the codes
    mem.remove(ids_before[:30])
    after_writes = mem.query(q, k=32)
    mem.close()
    again = Memory.open(path)
    try:
        np.testing.assert_array_equal(again.ids(), np.union1d(ids_before[30:], mem.ids()))
        got = again.query(q, k=32)
        np.testing.assert_array_equal(got.ids, after_writes.ids)  # the very same codes: same scores
        np.testing.assert_array_equal(got.scores, after_writes.scores)
        np.testing.assert_allclose(got.attention, after_writes.attention, atol=1e-12)
        w = again.get(np.arange(50, 101)).weights  # upserted with weight 3 (1..35 were removed since)
        np.testing.assert_array_equal(w, np.full(51, 3.0))
    finally:
        again.close()


def test_a_codebook_that_does_not_fit_is_refused(tmp_path):
    x, y = data(12_000, seed=2)
    path = tmp_path / "m"
    mem = Memory(DIM, index="IVF16,PQ4", rescore=False, path=path)
    mem.add(x, y)
    mem.save()
    mem.close()
    snap = snapshot_of(path)
    table = pa.ipc.open_file(snap).read_all()
    meta = dict(table.schema.metadata)
    cases = {
        "garbage": b"not a faiss index",
        "other dim": _codebook("IVF16,PQ4", DIM * 2, x),
        "other kind": _codebook("IVF16,SQ8", DIM, x),
    }
    for name, book in cases.items():
        bad = table.replace_schema_metadata({**meta, b"faiss_codebook": book})
        with pa.OSFile(str(snap), "wb") as f, pa.ipc.new_file(f, bad.schema) as w:
            w.write_table(bad)
        _resign(path, snap)
        with pytest.raises(engine.CorruptFileError):
            Memory.open(path)


def _codebook(spec, dim, x):
    import faiss

    idx = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    idx.train(np.resize(x, (len(x), dim)).astype(np.float32))
    return bytes(faiss.serialize_index(idx))


def _resign(path, snap):
    """Rewrite the manifest to accept the crafted snapshot (a crafted, not a damaged, file)."""
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc.pop("checksum")
    doc["snapshot"]["sha256"] = hashlib.sha256(snap.read_bytes()).hexdigest()
    manifest.write_bytes(store.manifest_bytes(doc))


def test_usage_times_only_where_the_age_policy_is_asked_for():
    x, y = data(300)
    plain, aged = Memory(DIM, index="Flat"), Memory(DIM, index="Flat", policy="age")
    for mem in (plain, aged):
        mem.add(x, y)
    assert aged.stats().bytes_ids - plain.stats().bytes_ids >= 8 * len(x)
    with pytest.raises(engine.InvalidValueError, match="track_usage"):
        plain.compact(budget=100, policy="age")
    assert len(plain) == 300
    aged.compact(budget=100)
    assert len(aged) <= 100


ID_RUNS = {
    "automatic": [None, None, None],
    "stepped": [np.arange(5, 500, 7), np.arange(5 + 7 * 71, 5 + 7 * 200, 7)],
    "one, then a run": [np.array([40]), np.arange(43, 430, 3)],
    "a run, then a gap": [np.arange(100, 200), np.arange(300, 400)],
    "descending": [np.arange(900, 700, -1)],
    "a run, then upserts": [np.arange(0, 300), np.arange(50, 120)],
}


@pytest.mark.parametrize("case", ID_RUNS, ids=list(ID_RUNS))
def test_ids_read_back_by_rows_match_the_ids_written(case):
    """Reads compute ids while they run arithmetically with rows: every shape of id
    sequence must still give back the ids written, as a dict of id -> vector says."""
    rng = np.random.default_rng(11)
    mem = Memory(DIM, index="Flat", temperature=0.05)
    ref: dict[int, np.ndarray] = {}
    for ids in ID_RUNS[case]:
        n = 150 if ids is None else len(ids)
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        got = mem.add(x, rng.integers(0, 5, n), ids=ids, upsert=True)
        ref.update(zip(got.tolist(), x / np.linalg.norm(x, axis=1, keepdims=True)))
    keys = np.array(sorted(ref))
    z = np.stack([ref[i] for i in keys])
    q = rng.standard_normal((5, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best = keys[brute_force_topk(z, q, 3, metric="ip")[0]]
    assert mem.query(q, k=3).ids.tolist() == best.tolist()
    for i in range(len(q)):
        assert mem.query(q[i], k=3).ids.tolist() == best[i:i + 1].tolist()
