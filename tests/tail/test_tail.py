"""Full-attention probabilities (``probs="full"``) against exact dense attention in float64."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import Memory
from engine.data import clustered
from engine.data.synthetic import isotropic
from engine.testing import dense_attention, omitted_mass, slot_attention, total_variation

DIM = 16
QUERIES = np.random.default_rng(99).standard_normal((12, DIM)).astype(np.float32)


def reference(mem, q, classes=None, metric=None):
    """(n, C) probabilities of dense attention over every live slot of ``mem``, float64
    (engine.testing), columns ``classes`` (default: the memory's live labels)."""
    slots = mem.get(mem.ids())
    return dense_attention(slots.vectors, slots.labels, q, temperature=mem.temperature, metric=metric or mem.metric,
                           weights=slots.weights, classes=classes)


def omitted(mem, q, res, metric=None):
    """(n,) the true attention share of the live slots outside each query's returned top-k."""
    slots = mem.get(mem.ids())
    return omitted_mass(slots.vectors, q, res.ids, temperature=mem.temperature, metric=metric or mem.metric,
                        weights=slots.weights, ids=slots.ids)


@pytest.mark.parametrize("metric,atol", [("ip", 1e-9), ("cosine", 1e-6)])
def test_a_flat_memory_answers_dense_attention(rng, metric, atol):
    """Flat scores every slot: the full answer is dense attention (to float rounding: the
    inner product is computed in float64; cosine queries are normalised in float32 first)."""
    x, y = clustered(5000, DIM, n_classes=30, seed=1)
    if metric == "ip":
        x = x * rng.uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)
    mem = Memory(DIM, index="Flat", metric=metric, temperature=0.1, probs="full")
    ids = mem.add(x, y, weights=rng.uniform(0.5, 2.0, len(x)))
    mem.remove(ids[::9])
    q = x[rng.integers(0, len(x), 40)] + 0.3 * rng.standard_normal((40, DIM)).astype(np.float32)
    res = mem.query(q, k=16)
    np.testing.assert_allclose(res.probs, reference(mem, q, res.classes, metric), atol=atol)
    slots = mem.get(mem.ids())
    a = slot_attention(slots.vectors, q, temperature=0.1, metric=metric, weights=slots.weights)
    col = np.searchsorted(slots.ids, res.ids)
    np.testing.assert_allclose(res.attention, np.take_along_axis(a, col, axis=1), atol=atol)
    assert res.exact_bound and (res.tail_bound == 0).all()
    np.testing.assert_allclose(res.tail_estimate, omitted(mem, q, res, metric), atol=atol)


def test_an_ivf_flat_memory_is_exact_over_the_lists_it_probes(rng):
    x, y = isotropic(20_000, DIM, n_classes=200, seed=2)
    q = x[rng.integers(0, len(x), 60)] + 0.2 * rng.standard_normal((60, DIM)).astype(np.float32)
    every = Memory(DIM, index="IVF32,Flat", nprobe=32, temperature=0.05, probs="full")
    every.add(x, y)
    res = every.query(q, k=16)
    p = reference(every, q, res.classes)
    np.testing.assert_allclose(res.probs, p, atol=1e-5)
    assert (res.tail_bound <= 1e-12).all() and res.exact_bound
    some = Memory(DIM, index="IVF32,Flat", nprobe=4, temperature=0.05, probs="full")
    some.add(x, y)
    full, topk = some.query(q, k=16), some.query(q, k=16, probs="top-k")
    assert full.ids.tolist() == topk.ids.tolist()  # the same lists scanned, the same top-k
    tv_full, tv_topk = total_variation(full.probs, p), total_variation(topk.probs, p)
    assert tv_full.mean() < tv_topk.mean() / 2, (tv_full.mean(), tv_topk.mean())
    # what was scored is exact, what was not is estimated: the error stays within twice the bound
    assert (tv_full <= 2 * full.tail_bound + 1e-6).all()


def test_full_probs_are_far_closer_to_full_attention_than_top_k(rng):
    x, y = clustered(20_000, DIM, n_classes=40, seed=3)
    mem = Memory(DIM, temperature=0.05, probs="full")
    mem.add(x, y)
    q = x[rng.integers(0, len(x), 200)] + 0.2 * rng.standard_normal((200, DIM)).astype(np.float32)
    a, b = mem.query(q, k=32, probs="top-k"), mem.query(q, k=32)
    ref = dense_attention(x, y, q, temperature=0.05, classes=b.classes)
    tv_topk, tv_full = total_variation(a.probs, ref).mean(), total_variation(b.probs, ref).mean()
    assert tv_full < 0.05 and tv_full < tv_topk / 3, (tv_topk, tv_full)
    assert np.all((b.tail_estimate >= 0) & (b.tail_estimate < 1))
    np.testing.assert_allclose(b.probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(b.attention.sum(axis=1) + b.tail_estimate, 1.0, atol=1e-9)
    assert a.tail_estimate is None
    one = mem.query(q[3], k=32)  # a lone query gets its row of the batch
    np.testing.assert_allclose(one.probs, b.probs[3:4], atol=1e-6)


@pytest.mark.parametrize("spec,opts", [("PCA8,IVF4,Flat", {}), ("IVF4,PQ4x4", {"rescore": False}), ("HNSW8", {}),
                                       ("IVF4,Flat", {"metric": "ip"})])
def test_every_kind_of_index_answers_full_probs(rng, spec, opts):
    x, y = clustered(3000, DIM, n_classes=6, seed=2)
    mem = Memory(DIM, index=spec, temperature=0.1, probs="full", **opts)
    ids = mem.add(x, y)
    mem.remove(ids[:300])
    res = mem.query(QUERIES, k=16)
    assert np.isfinite(res.probs).all() and np.all((res.tail_estimate >= 0) & (res.tail_estimate < 1))
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, atol=1e-9)
    assert not np.isin(res.ids, ids[:300]).any()


# Indexes whose full answer scores exactly the retrieved slots: what they leave unscored is
# exactly what lies outside the returned top-k.
RETRIEVED = {"HNSW": {"index": "HNSW8"}, "IVF-PQ rescored": {"index": "IVF32,PQ4x4", "nprobe": 2},
             "HNSW inner product": {"index": "HNSW8", "metric": "ip"}}


@pytest.mark.parametrize("case", RETRIEVED, ids=list(RETRIEVED))
@pytest.mark.parametrize("temperature", [0.02, 0.2])
def test_the_certificate_bounds_the_true_unscored_mass(rng, case, temperature):
    opts = dict(RETRIEVED[case])
    metric = opts.get("metric", "cosine")
    x, y = clustered(12_000, DIM, n_classes=30, seed=5)
    if metric == "ip":
        x = x * rng.uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)
    mem = Memory(DIM, temperature=temperature, probs="full", **opts)
    ids = mem.add(x, y, weights=rng.uniform(0.5, 2.0, len(x)))
    mem.query(QUERIES, k=4)  # the cells exist from here on and must follow the removal
    mem.remove(ids[::10])
    q = x[rng.integers(0, len(x), 60)] + 0.3 * rng.standard_normal((60, DIM)).astype(np.float32)
    res = mem.query(q, k=16)
    assert res.exact_bound
    p = reference(mem, q, res.classes, metric)
    assert (omitted(mem, q, res, metric) <= res.tail_bound + 1e-6).all()
    assert (total_variation(res.probs, p) <= 2 * res.tail_bound + 1e-6).all()


@pytest.mark.parametrize("index", ["Flat", "HNSW8", "IVF8,Flat"])
def test_removing_a_huge_slot_leaves_no_false_certificate(index):
    """One slot of mass 1e30 far from the query, slots of mass 1 near it: once it is removed
    (after a full query built the cells) the answer and its bound must be those of the
    memory without it, not what cancelled running sums leave."""
    rng = np.random.default_rng(4)
    near = np.tile(np.eye(DIM, dtype=np.float32)[0], (600, 1)) + 0.05 * rng.standard_normal((600, DIM)).astype(
        np.float32)
    far = -np.eye(DIM, dtype=np.float32)[:1]
    x = np.concatenate([near, far])
    y = np.r_[np.arange(600) % 2, 0]
    mem = Memory(DIM, index=index, temperature=0.5, nprobe=1 if index.startswith("IVF") else None, probs="full")
    ids = mem.add(x, y, weights=np.r_[np.ones(600), 1e30])
    q = np.eye(DIM, dtype=np.float32)[:1]
    mem.query(q, k=4)
    mem.remove(ids[-1:])
    res = mem.query(q, k=4)
    p = reference(mem, q, res.classes)
    if index.startswith("HNSW"):  # it scores the retrieved slots: the rest is unscored
        assert (omitted(mem, q, res) <= res.tail_bound + 1e-9).all()
    assert total_variation(res.probs, p).max() <= 2 * res.tail_bound.max() + 1e-6
    np.testing.assert_allclose(res.probs, p, atol=0.05)


def test_cells_follow_adds_removes_compaction_and_reopen(rng, tmp_path):
    """After every change the certificate still holds and the answer stays within it of
    dense attention over the slots the memory now holds (no stale cell)."""
    x, y = clustered(6000, DIM, n_classes=12, seed=7)
    mem = Memory(DIM, index="HNSW8", temperature=0.1, probs="full", path=tmp_path / "m")
    ids = mem.add(x[:4000], y[:4000], weights=rng.uniform(0.5, 2.0, 4000))
    mem.query(QUERIES, k=8)  # the cells now exist and must be kept up to date from here on

    def check(m):
        res = m.query(QUERIES, k=8)
        p = reference(m, QUERIES, res.classes)
        assert (omitted(m, QUERIES, res) <= res.tail_bound + 1e-6).all()
        assert (total_variation(res.probs, p) <= 2 * res.tail_bound + 1e-6).all()
        return res

    mem.remove(ids[y[:4000] == 3])  # a whole class goes
    assert 3 not in check(mem).classes
    mem.add(x[4000:], y[4000:])
    mem.remove(ids[y[:4000] != 3][::7][:100])
    check(mem)
    mem.compact(budget=500)
    before = check(mem)
    mem.close()
    again = Memory.open(tmp_path / "m")
    after = check(again)
    assert after.classes.tolist() == before.classes.tolist()


def test_probs_option_is_checked_and_kept(tmp_path):
    with pytest.raises(engine.InvalidValueError, match="probs"):
        Memory(DIM, probs="all")
    mem = Memory(DIM, probs="full", path=tmp_path / "m")
    mem.add(QUERIES, np.arange(len(QUERIES)) % 3)
    mem.close()
    assert Memory.open(tmp_path / "m").query(QUERIES[0]).tail_estimate is not None
    fresh = Memory(DIM)
    fresh.add(QUERIES, np.arange(len(QUERIES)) % 3)
    assert fresh.query(QUERIES[0], k=2, probs="full").tail_estimate is not None
    assert fresh.query(QUERIES[0], k=2, probs="top-k").tail_estimate is None


@pytest.mark.parametrize("index", ["HNSW8", "IVF32,Flat"])
def test_a_tail_target_widens_the_search_until_the_certificate_meets_it(rng, index):
    x, y = clustered(20_000, DIM, n_classes=40, seed=3)
    mem = Memory(DIM, index=index, temperature=0.05, probs="full", nprobe=1 if index.startswith("IVF") else None)
    mem.add(x, y)
    q = x[rng.integers(0, len(x), 50)] + 0.2 * rng.standard_normal((50, DIM)).astype(np.float32)
    plain = mem.query(q, k=16)
    res = mem.query(q, k=16, tail=0.2)
    assert (plain.tail_bound > 0.2).any() and (res.tail_bound <= 0.2).all()
    p = reference(mem, q, res.classes)
    assert (total_variation(res.probs, p) <= 2 * res.tail_bound + 1e-6).all()
    assert total_variation(res.probs, p).mean() <= total_variation(plain.probs, p).mean()


def test_stats_count_the_cells_once_built():
    x, y = clustered(6000, DIM, n_classes=12, seed=4)
    mem = Memory(DIM, index="HNSW8", probs="full")
    mem.add(x, y)
    before = mem.stats()
    assert before.bytes_tail == 0
    mem.query(QUERIES)
    after = mem.stats()
    # each slot's cell (4 bytes) and each class's mass and vector sum
    assert after.bytes_tail >= 6000 * 4 + 12 * 8 * (DIM + 1)
    assert after.bytes_total == before.bytes_total + after.bytes_tail


@pytest.mark.parametrize("index", ["HNSW32", "IVF16,Flat"])
@pytest.mark.parametrize("temperature", [1e-1, 1e-2, 5e-4])
@pytest.mark.parametrize("spread", [2.0, 1e30])
def test_small_temperatures_huge_masses_and_few_dimensions_stay_finite(index, temperature, spread):
    """Low dimensions and a tiny T are where a cell's model is worst and exponentials
    overflow first; masses up to 1e30 push them further. The answer must stay finite and
    within twice its bound of dense attention; with masses of one order, where dense
    attention is nearly one-hot, the full answer must name the same class."""
    rng = np.random.default_rng(0)
    d, n = 8, 1500
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 3, n)
    mem = Memory(d, index=index, temperature=temperature, probs="full", nprobe=1 if index.startswith("IVF") else None)
    mem.add(x, y, weights=np.exp(rng.uniform(0, np.log(spread), n)))
    q = x[:20] + 0.3 * rng.standard_normal((20, d)).astype(np.float32)
    res = mem.query(q, k=4)
    assert np.isfinite(res.probs).all() and np.isfinite(res.attention).all() and np.isfinite(res.tail_bound).all()
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, atol=1e-9)
    p = reference(mem, q, res.classes)
    assert (total_variation(res.probs, p) <= 2 * res.tail_bound + 1e-6).all()
    sharp = p.max(axis=1) > 0.99
    if spread < 10 and sharp.any():  # at least as often right as top-k (which misses what the search missed)
        topk = mem.query(q, k=4, probs="top-k")
        right = lambda r: (np.argmax(r.probs, axis=1)[sharp] == np.argmax(p, axis=1)[sharp]).mean()  # noqa: E731
        assert right(res) >= right(topk)


def test_a_lossy_index_asked_for_every_slot_is_not_certified(rng):
    x, y = clustered(3000, DIM, n_classes=6, seed=2)
    mem = Memory(DIM, index="IVF4,PQ4x4", rescore=False, temperature=0.1, probs="full")
    mem.add(x, y)
    res = mem.query(QUERIES, k=len(mem))
    assert not res.exact_bound


def test_the_list_route_in_chunks_of_queries_answers_as_one_batch(rng, monkeypatch):
    from engine.tail import full

    x, y = clustered(20_000, DIM, n_classes=40, seed=3)
    mem = Memory(DIM, index="IVF32,Flat", nprobe=4, temperature=0.05, probs="full")
    mem.add(x, y)
    q = x[rng.integers(0, len(x), 100)] + 0.2 * rng.standard_normal((100, DIM)).astype(np.float32)
    whole = mem.query(q, k=16)
    monkeypatch.setattr(full, "SCAN_RESULTS", 20_000)  # about 8 queries a chunk
    chunked = mem.query(q, k=16)
    np.testing.assert_array_equal(chunked.ids, whole.ids)
    # the estimate of unprobed lists is float32 products with the cells' means, whose BLAS
    # rounding depends on how many queries a product holds: equal to float32 rounding
    np.testing.assert_allclose(chunked.probs, whole.probs, atol=1e-6)
    np.testing.assert_allclose(chunked.tail_bound, whole.tail_bound, atol=1e-6)
    assert chunked.labels.tolist() == whole.labels.tolist()


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_a_query_whose_lists_hold_nothing_still_gets_a_distribution(metric):
    """Two points written many times: most IVF lists are empty, and a query probing one
    scans nothing. Its answer is all estimate, shared by the classes, never NaN or zero."""
    rng = np.random.default_rng(11)
    x = np.tile(rng.normal(0, 1, (1, 8)).astype(np.float32), (3000, 1))
    x[:1500] += 0.5
    y = rng.integers(0, 3, 3000)
    q = rng.normal(0, 1, (4, 8)).astype(np.float32)
    mem = Memory(8, metric=metric, index="IVF4,Flat", temperature=1e-3, probs="full")
    mem.add(x, y)
    res = mem.query(q, k=8)
    assert np.isfinite(res.probs).all() and np.allclose(res.probs.sum(axis=1), 1.0)
    assert ((res.ids >= 0).any(axis=1) | (res.tail_bound == 1.0)).all()
