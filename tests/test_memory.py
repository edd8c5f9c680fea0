"""Memory's public contract: ids, labels, upsert, get, remove, stats, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import Memory


def state(mem: Memory, probes: np.ndarray):
    """What a caller can observe: size, ids, labels and answers to fixed probes."""
    if len(mem) == 0:
        return (0,)
    res = mem.query(probes, k=10)
    return (len(mem), tuple(res.ids.ravel()), tuple(res.labels), res.probs.round(12).tobytes(), mem.stats())


@pytest.fixture
def mem(rng):
    m = Memory(8, index="Flat")
    m.add(rng.standard_normal((50, 8)), rng.integers(0, 4, 50))
    return m


@pytest.fixture
def probes(rng):
    return rng.standard_normal((5, 8))


def test_ids_are_ours_stable_and_fresh(rng):
    m = Memory(4, index="Flat")
    a = m.add(rng.standard_normal((3, 4)), [1, 2, 3])
    assert a.dtype == np.int64 and list(a) == [0, 1, 2]
    m.remove([1])
    b = m.add(rng.standard_normal((2, 4)), [1, 1])
    assert list(b) == [3, 4]  # never reuses a removed id
    c = m.add(rng.standard_normal((1, 4)), [2], ids=[100])
    assert list(c) == [100] and 100 in m and 1 not in m and "x" not in m
    assert list(m.add(rng.standard_normal((1, 4)), [2])) == [101]


def test_query_returns_ids_not_positions(rng):
    m = Memory(4, index="Flat")
    x = rng.standard_normal((6, 4))
    m.add(x, [0, 0, 1, 1, 2, 2], ids=[60, 50, 40, 30, 20, 10])
    m.remove([50])
    res = m.query(x[3], k=1)
    assert res.ids[0, 0] == 30 and res.labels[0] == 1


def test_string_labels_and_vocabulary(rng):
    m = Memory(4, index="Flat")
    m.add(rng.standard_normal((4, 4)), ["cat", "dog", "cat", "eel"])
    res = m.query(rng.standard_normal((2, 4)), k=4)
    assert sorted(res.classes.tolist()) == ["cat", "dog", "eel"]
    assert set(res.labels) <= {"cat", "dog", "eel"}
    with pytest.raises(ValueError, match="labels are str"):
        m.add(rng.standard_normal((1, 4)), [3])


def test_removed_class_leaves_the_columns(rng):
    m = Memory(4, index="Flat")
    ids = m.add(rng.standard_normal((3, 4)), [7, 8, 9])
    m.remove(ids[1])
    assert m.query(rng.standard_normal(4)).classes.tolist() == [7, 9]


def test_upsert_replaces(rng):
    m = Memory(4, index="Flat")
    x = rng.standard_normal((2, 4))
    m.add(x, [0, 1], ids=[5, 6])
    new = np.array([[1.0, 0, 0, 0]])
    m.add(new, [3], ids=[5], upsert=True)
    got = m.get([5])
    assert got.labels == [3] and len(m) == 2
    np.testing.assert_allclose(got.vectors[0], new[0])  # stored L2-normalised (already unit here)


def test_get_and_weights(rng):
    m = Memory(4, metric="ip", index="Flat")
    x = rng.standard_normal((3, 4)).astype(np.float32)
    ids = m.add(x, [1, 2, 3], weights=[1.0, 2.5, 4.0])
    got = m.get(ids[::-1])
    assert got.labels == [3, 2, 1]
    np.testing.assert_allclose(got.weights, [4.0, 2.5, 1.0])
    np.testing.assert_allclose(got.vectors, x[::-1])  # ip metric stores vectors as given


def test_stats_counts_bytes(mem):
    s = mem.stats()
    assert s.slots == 50 and s.classes <= 4 and s.dim == 8 and s.index == "Flat"
    # a Flat index holds the vectors exactly, so the memory keeps no second copy
    assert s.bytes_vectors == 0 and s.bytes_index >= 50 * 8 * 4 and s.bytes_ids >= 50 * 8
    assert s.as_dict()["bytes_total"] == s.bytes_vectors + s.bytes_index + s.bytes_ids


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat", "HNSW8"])
def test_vectors_live_once_in_exact_indexes(rng, spec, tmp_path):
    """Flat, IVF-Flat and HNSW-Flat give back the exact vectors: get, snapshot and reopen agree."""
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = Memory(8, metric="ip", index=spec, path=tmp_path / "m")  # ip: vectors stored as given
    ids = m.add(x, np.arange(1000) % 5)
    m.remove(ids[:10])
    assert m.stats().index == spec and m.stats().bytes_vectors == 0
    np.testing.assert_array_equal(m.get(ids[10:]).vectors, x[10:])
    m.save()
    m.close()
    with Memory.open(tmp_path / "m") as again:
        np.testing.assert_array_equal(again.get(ids[10:]).vectors, x[10:])


def test_lossy_index_keeps_vectors_to_rescore_unless_told_not_to(rng):
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:50] + 0.05 * rng.standard_normal((50, 16)).astype(np.float32)
    exact = Memory(16, index="IVF4,PQ4x4")
    compact = Memory(16, index="IVF4,PQ4x4", rescore=False)
    for m in (exact, compact):
        m.add(x, np.arange(3000) % 7)
        assert m.stats().index == "IVF4,PQ4x4"
    assert exact.stats().bytes_vectors >= 3000 * 16 * 4 and compact.stats().bytes_vectors == 0
    assert exact.stats().bytes_total - compact.stats().bytes_total == exact.stats().bytes_vectors
    np.testing.assert_array_equal(exact.get([5]).vectors[0], x[5])
    approx = compact.get([5]).vectors[0]  # PQ reconstruction: close, not equal
    assert not np.array_equal(approx, x[5]) and np.dot(approx, x[5]) > 0.8
    res, qn = exact.query(q, k=8), q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(res.scores, np.einsum("nd,nkd->nk", qn, x[res.ids]), atol=1e-5)


def test_k_above_size_is_clamped_and_said(mem, probes):
    res = mem.query(probes, k=1000)
    assert res.k == 50 and res.k_requested == 1000 and res.k_clamped
    assert res.ids.shape == (5, 50)


def test_single_query_vector(mem, probes):
    res = mem.query(probes[0], k=3)
    assert res.probs.shape == (1, len(res.classes)) and len(res) == 1


# -- bad input: a clear error, and the memory unchanged -------------------------------------
BAD_ADDS = [
    ("wrong dimension", lambda r: (r.standard_normal((2, 9)), [0, 1]), {}, engine.DimensionError),
    ("NaN", lambda r: (np.array([[np.nan] * 8, [1.0] * 8]), [0, 1]), {}, ValueError),
    ("inf", lambda r: (np.array([[np.inf] * 8]), [0]), {}, ValueError),
    ("label count", lambda r: (r.standard_normal((3, 8)), [0, 1]), {}, ValueError),
    ("mixed labels", lambda r: (r.standard_normal((2, 8)), [0, "a"]), {}, ValueError),
    ("zero vector", lambda r: (np.zeros((1, 8)), [0]), {}, ValueError),
    ("duplicate id", lambda r: (r.standard_normal((1, 8)), [0]), {"ids": [3]}, engine.DuplicateIdError),
    ("repeated ids", lambda r: (r.standard_normal((2, 8)), [0, 0]), {"ids": [500, 500]}, engine.DuplicateIdError),
    ("negative id", lambda r: (r.standard_normal((1, 8)), [0]), {"ids": [-4]}, ValueError),
    ("bad weight", lambda r: (r.standard_normal((1, 8)), [0]), {"weights": [0.0]}, ValueError),
    ("NaN weight", lambda r: (r.standard_normal((1, 8)), [0]), {"weights": [np.nan]}, ValueError),
    ("weights count", lambda r: (r.standard_normal((2, 8)), [0, 1]), {"weights": [1.0]}, ValueError),
    ("mixed label array", lambda r: (r.standard_normal((2, 8)), np.array([0, "a"], dtype=object)), {}, ValueError),
    ("float labels", lambda r: (r.standard_normal((2, 8)), [0.0, 1.0]), {}, ValueError),
    ("bool labels", lambda r: (r.standard_normal((2, 8)), [True, False]), {}, ValueError),
    ("2-d labels", lambda r: (r.standard_normal((2, 8)), np.array([[0], [1]])), {}, ValueError),
    ("label beyond int64", lambda r: (r.standard_normal((1, 8)), [2**63]), {}, ValueError),
    ("complex vectors", lambda r: (r.standard_normal((1, 8)) * 1j, [0]), {}, ValueError),
    ("string vectors", lambda r: (np.full((1, 8), "1.0"), [0]), {}, ValueError),
    ("float ids", lambda r: (r.standard_normal((1, 8)), [0]), {"ids": [1.0]}, ValueError),
    ("id beyond int64", lambda r: (r.standard_normal((1, 8)), [0]), {"ids": [2**63]}, ValueError),
    ("huge weight", lambda r: (r.standard_normal((1, 8)), [0]), {"weights": [1e300]}, ValueError),
    ("complex weight", lambda r: (r.standard_normal((1, 8)), [0]), {"weights": [1 + 1j]}, ValueError),
]


@pytest.mark.parametrize("case", BAD_ADDS, ids=[c[0] for c in BAD_ADDS])
def test_bad_add_is_refused_and_changes_nothing(mem, probes, rng, case):
    _, make, kwargs, exc = case
    before = state(mem, probes)
    x, y = make(rng)
    with pytest.raises(exc):
        mem.add(x, y, **kwargs)
    assert state(mem, probes) == before


def test_remove_unknown_lists_them_and_changes_nothing(mem, probes):
    before = state(mem, probes)
    with pytest.raises(engine.UnknownIdError) as info:
        mem.remove([1, 2, 999, 1000])
    assert info.value.ids == [999, 1000] and "999" in str(info.value)
    assert isinstance(info.value, KeyError)
    assert state(mem, probes) == before
    with pytest.raises(KeyError):
        mem.get([5, 12345])


@pytest.mark.parametrize("kwargs,exc", [
    ({"k": 0}, ValueError), ({"k": 2.5}, ValueError), ({"tail": 0.0}, ValueError), ({"tail": 2}, ValueError),
    ({"probs": "all"}, ValueError), ({"probs": 1}, ValueError)])
def test_bad_query_arguments(mem, probes, kwargs, exc):
    with pytest.raises(exc):
        mem.query(probes, **kwargs)


def test_bad_queries(mem):
    with pytest.raises(engine.DimensionError):
        mem.query(np.ones((2, 7)))
    with pytest.raises(ValueError, match="NaN"):
        mem.query(np.full((1, 8), np.nan))


def test_query_empty_memory():
    m = Memory(4)
    with pytest.raises(engine.EmptyMemoryError):
        m.query(np.ones(4))
    ids = m.add(np.ones((1, 4)), [0])
    m.remove(ids)
    with pytest.raises(engine.EmptyMemoryError):
        m.query(np.ones(4))


@pytest.mark.parametrize("kwargs", [{"metric": "l1"}, {"temperature": 0}, {"temperature": float("nan")}])
def test_bad_construction(kwargs):
    with pytest.raises(ValueError):
        Memory(8, **kwargs)
    with pytest.raises(ValueError):
        Memory(0)


def test_temperature_is_a_setting(mem, probes):
    sharp = mem.query(probes).probs.max(axis=1)
    mem.temperature = 10.0
    flat = mem.query(probes).probs.max(axis=1)
    assert (flat < sharp).all()
    with pytest.raises(ValueError):
        mem.temperature = -1
    assert mem.temperature == 10.0


# -- strict inputs and extreme values ------------------------------------------------------------
def test_a_refused_add_leaves_the_memory_ready_for_the_next(rng):
    m = Memory(4)
    with pytest.raises(ValueError, match="all int or all str"):
        m.add(rng.standard_normal((2, 4)), [1, "a"])
    with pytest.raises(ValueError, match="NaN"):
        m.add(np.full((1, 4), np.nan), ["a"])
    assert list(m.add(rng.standard_normal((2, 4)), [3, 4])) == [0, 1]  # no label kind was fixed by the refusals
    with pytest.raises(ValueError, match="int"):
        m.add(rng.standard_normal((1, 4)), ["x"])
    assert m.query(rng.standard_normal(4), k=2).classes.tolist() == [3, 4]


@pytest.mark.parametrize("kwargs", [{"temperature": 1e-320}, {"temperature": 1e300}, {"temperature": "0.1"},
                                    {"temperature": True}, {"temperature": 1 + 0j}])
def test_temperature_outside_its_range_is_refused(kwargs):
    with pytest.raises(engine.InvalidValueError, match="temperature"):
        Memory(8, **kwargs)


def test_automatic_ids_after_ids_at_the_int64_limit(tmp_path, rng):
    top = 2**63 - 1
    m = Memory(4, path=tmp_path / "m")
    m.add(rng.standard_normal((2, 4)), [0, 1], ids=[top, 5])
    fresh = m.add(rng.standard_normal((6, 4)), [0] * 6)
    assert len(set(fresh.tolist()) | {top, 5}) == 8 and (fresh >= 0).all()
    more = m.add(rng.standard_normal((3, 4)), [1] * 3)
    assert not set(more.tolist()) & set(fresh.tolist()) | {top, 5} & set(more.tolist())
    m.compact(budget=2)  # merged slots get fresh ids too
    assert len(m) == 2 and (m.ids() >= 0).all()
    expected = m.ids().tolist()
    m.close()
    with Memory.open(tmp_path / "m") as again:
        assert again.ids().tolist() == expected
        assert len(again.add(rng.standard_normal((2, 4)), [0, 0])) == 2


def true_tail(mem, res, vectors, weights, queries, metric):
    """Attention mass outside the returned slots, by float64 dense attention over every slot."""
    z = np.asarray(vectors, np.float64)
    q = np.asarray(queries, np.float64)
    if metric == "cosine":
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    logits = q @ z.T / mem.temperature + np.log(weights)[None, :]
    logits -= logits.max(axis=1, keepdims=True)
    a = np.exp(logits)
    a /= a.sum(axis=1, keepdims=True)
    ids = np.arange(len(z))
    return np.array([a[i, ~np.isin(ids, res.ids[i])].sum() for i in range(len(q))])


@pytest.mark.parametrize("case", ["huge and tiny weights", "tiny temperature", "large temperature",
                                  "huge inner products", "weight removed again"])
def test_extreme_values_give_finite_answers_and_a_true_bound(rng, case):
    n, metric, temperature = 300, "cosine", 0.1
    x = rng.standard_normal((n, 8))
    w = np.ones(n)
    if case == "huge and tiny weights":
        w = 10.0 ** rng.uniform(-12, 30, n)
    if case == "tiny temperature":
        temperature = 1e-6
    if case == "large temperature":
        temperature = 1e6
    if case == "huge inner products":
        metric, temperature = "ip", 1e3
        x *= 1e14
    m = Memory(8, metric=metric, index="Flat", temperature=temperature)
    m.add(x, rng.integers(0, 5, n), weights=w)
    if case == "weight removed again":
        big = m.add(rng.standard_normal((1, 8)), [0], weights=[1e30])
        m.remove(big)
    q = rng.standard_normal((20, 8)) * (1e14 if metric == "ip" else 1)
    res = m.query(q, k=10)
    assert np.isfinite(res.probs).all() and np.isfinite(res.tail_bound).all()
    assert ((res.tail_bound >= 0) & (res.tail_bound <= 1)).all()
    assert np.allclose(res.probs.sum(axis=1), 1)
    truth = true_tail(m, res, x, w, q, metric)
    assert (res.tail_bound >= truth - 1e-9).all(), (res.tail_bound - truth).min()


@pytest.mark.parametrize("spec", ["IVF16,Flat", "HNSW16", "IVF16,PQ4"])
def test_k_covering_the_memory_returns_every_live_slot(rng, spec):
    m = Memory(8, index=spec, nprobe=1 if spec.startswith("IVF") else None)
    m.add(rng.standard_normal((3000, 8)), rng.integers(0, 5, 3000))
    m.remove(np.arange(0, 3000, 4))
    m.remove(np.arange(1, 2000, 4))
    res = m.query(rng.standard_normal((3, 8)), k=len(m))
    for row in res.ids:
        assert sorted(row.tolist()) == m.ids().tolist()
    assert (res.tail_bound == 0).all()


def test_automatic_ids_stay_in_their_id_space(tmp_path):
    """A shard role (index 2 of 3): every automatic id, added or made by a merge, is 2 mod 3."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((600, 8)).astype(np.float32)
    y = rng.integers(0, 5, 600)
    mem = Memory(8, shard=engine.ShardRole(2, 3), path=tmp_path / "m")
    a = mem.add(x[:300], y[:300])
    mem.add(x[300:310], y[300:310], ids=np.arange(1000, 1010))  # explicit ids are the caller's
    b = mem.add(x[310:], y[310:])
    assert (a % 3 == 2).all() and (b % 3 == 2).all() and b.min() > 1009
    mem.compact(budget=40, policy="merge")
    merged = np.setdiff1d(mem.ids(), np.concatenate([a, b, np.arange(1000, 1010)]))
    assert len(merged) and (merged % 3 == 2).all()
    mem.close()
    again = Memory.open(tmp_path / "m")
    c = again.add(x[:5], y[:5])
    assert (c % 3 == 2).all() and c.min() > mem.ids().max()
    again.close()
    for index, count in ((0, 0), (3, 3), (-1, 2), (0, 2.5), (0, True)):
        with pytest.raises(engine.InvalidValueError):
            Memory(8, shard=engine.ShardRole(index, count))
    with pytest.raises(engine.InvalidValueError):
        Memory(8, shard=(2, 3))


def test_engine_errors_pickle_whole():
    """Errors cross process boundaries (Ray shards, multiprocessing) with their attributes."""
    import pickle

    cases = [engine.UnknownIdError("unknown ids: [3, 4]", [3, 4]), engine.StorageError("disk full", 28, uncertain=True),
             engine.MemoryFailedError("refused"), engine.ShardUnavailableError("down", [1], [4, 5]),
             engine.InvalidValueError("bad")]
    for error in cases:
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        for attr in ("ids", "errno", "uncertain", "shards"):
            assert getattr(back, attr, None) == getattr(error, attr, None)
    assert pickle.loads(pickle.dumps(cases[3])).written.tolist() == [4, 5]


def test_torch_tensors_are_taken_wherever_arrays_are():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    y = np.arange(60) % 3
    ref = Memory(8, index="Flat", temperature=0.2)
    ref.add(x, y, weights=np.linspace(1, 2, 60), ids=np.arange(60) * 2)
    mem = Memory(8, index="Flat", temperature=0.2)
    vectors = torch.tensor(x, requires_grad=True) * 1.0  # a tensor with a graph behind it
    mem.add(vectors, torch.tensor(y), weights=torch.linspace(1, 2, 60, dtype=torch.float64),
            ids=torch.arange(60) * 2)
    q = torch.tensor(x[:5], requires_grad=True)
    a, b = ref.query(x[:5], k=6), mem.query(q, k=6)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-12)
    # ids 0, 2: labels 0, 1
    assert mem.remove(torch.tensor([0, 2])) == 2 and len(mem.ids(labels=torch.tensor([1]))) == 19


def test_tensors_numpy_lacks_and_zero_d_labels():
    torch = pytest.importorskip("torch")
    mem = Memory(4, index="Flat", temperature=0.2)
    mem.add(torch.ones((3, 4), dtype=torch.bfloat16), torch.tensor([1, 2, 1]))
    assert mem.query(torch.ones(4, dtype=torch.bfloat16), k=2).labels.tolist() in ([1], [2])
    assert len(mem.ids(labels=torch.tensor(1))) == 2 and len(mem.ids(labels=np.array(2))) == 1


def test_a_result_indexed_by_query_is_that_querys_answer():
    """res[i] (and res[a:b]) answer as the queries asked alone would, probabilities included."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    mem = Memory(8, index="Flat", temperature=0.2)
    mem.add(x, rng.integers(0, 6, 500))
    q = x[:5] + 0.05
    res = mem.query(q, k=16)
    for i in (0, 3, -1):
        alone = mem.query(q[i], k=16)
        assert len(res[i]) == 1 and res[i].labels.tolist() == alone.labels.tolist()
        np.testing.assert_allclose(res[i].probs, alone.probs, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(res[i].ids[0][res[i].ids[0] >= 0], alone.ids[0][alone.ids[0] >= 0])
    assert len(res[1:4]) == 3 and res[1:4].labels.tolist() == res.labels[1:4].tolist()
    np.testing.assert_allclose(res[1:4].probs, res.probs[1:4])
    for bad in (5, -6):
        with pytest.raises(engine.IndexOutOfRangeError):
            res[bad]
    with pytest.raises(engine.InvalidValueError):
        res["a"]


def test_fresh_ids_past_the_int64_limit_are_never_handed_out_twice():
    """Once counting up would pass 2**63 - 1, fresh ids are the lowest free ones: two batches
    taken in one write (a compaction's) are disjoint and miss every id in use."""
    from engine.ids import INT64_MAX, Counter

    counter = Counter(INT64_MAX, lambda: np.array([0, 1, 3], np.int64))
    first, second, third = counter.take(3), counter.take(2), counter.take(1)
    assert first.tolist() == [2, 4, 5] and second.tolist() == [6, 7] and third.tolist() == [INT64_MAX]
    mem = Memory(4, index="Flat")
    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    mem.add(x[:20], np.arange(20) % 2, ids=np.arange(INT64_MAX - 19, INT64_MAX + 1, dtype=np.uint64))
    new = mem.add(x[20:], np.arange(20) % 2)
    assert len(set(new.tolist()) | set(mem.ids().tolist())) == 40 and new.max() < 20


def test_options_are_checked_when_a_memory_is_made(tmp_path):
    """An unknown option, options of the wrong type, and a bad shard role are refused clearly,
    before anything is written; MemoryOptions given whole and keywords on top of it combine."""
    for bad in (lambda: {"foo": 1}, lambda: {"options": {"metric": "ip"}},
                lambda: {"shard": engine.ShardRole(0, 2, share=2.0)}, lambda: {"shard": (0, 2)}):
        with pytest.raises(engine.InvalidValueError):
            Memory(8, path=tmp_path / "m", **bad())
        assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())
    mem = Memory(8, options=engine.MemoryOptions(metric="ip", index="Flat"), temperature=0.5)
    assert (mem.options.metric, mem.options.index, mem.temperature) == ("ip", "Flat", 0.5)
