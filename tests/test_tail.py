"""The estimated tail (``Memory(probs="full")``) against exact dense attention in float64."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import Memory
from engine.data import clustered

from .reference import dense_reference

DIM = 16


def total_variation(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(axis=1)


def dense_probs(mem: Memory, res, metric="cosine"):
    """Full attention over every live slot of ``mem`` (float64), columns as ``res.classes``."""
    slots = mem.get(mem.ids())
    return slots, dense_reference(slots.vectors, np.array(slots.labels), slots.weights, QUERIES, res.classes,
                                  mem.temperature, metric=metric)[1]


QUERIES = np.random.default_rng(99).standard_normal((12, DIM)).astype(np.float32)


@pytest.mark.parametrize("index,metric", [("Flat", "cosine"), ("IVF4,Flat", "cosine"), ("Flat", "ip")])
def test_the_estimate_is_exact_when_every_group_holds_identical_vectors(rng, index, metric):
    """A group's model is exact for identical vectors, so probs must be full attention."""
    n_classes = 10
    base = rng.standard_normal((n_classes, DIM)).astype(np.float32)
    if metric == "cosine":
        base /= np.linalg.norm(base, axis=1, keepdims=True)
    else:
        base *= 0.3
    y = np.repeat(np.arange(n_classes), 40)
    x = base[y]
    w = rng.uniform(0.5, 2.0, len(y))
    mem = Memory(DIM, index=index, metric=metric, temperature=0.2, probs="full",
                 nprobe=4 if index.startswith("IVF") else None)
    mem.add(x, y, weights=w)
    res = mem.query(QUERIES, k=5)
    _, full = dense_probs(mem, res, metric)
    np.testing.assert_allclose(res.probs, full, rtol=1e-6, atol=1e-7)  # float32 scores, as top-k
    np.testing.assert_allclose(res.attention.sum(axis=1) + res.tail_estimate, 1.0, atol=1e-12)


def test_full_probs_are_far_closer_to_full_attention_than_top_k(rng):
    x, y = clustered(20_000, DIM, n_classes=40, seed=3)
    topk, full = Memory(DIM, temperature=0.05, probs="top-k"), Memory(DIM, temperature=0.05)
    for mem in (topk, full):
        mem.add(x, y)
    q = x[rng.integers(0, len(x), 200)] + 0.2 * rng.standard_normal((200, DIM)).astype(np.float32)
    a, b = topk.query(q, k=32), full.query(q, k=32)
    _, ref = dense_reference(x, y, np.ones(len(y)), q, b.classes, 0.05)
    tv_topk, tv_full = total_variation(a.probs, ref).mean(), total_variation(b.probs, ref).mean()
    # a Flat memory has one cell, so a group is a whole class (multimodal here): 0.18 -> 0.06
    assert tv_full < 0.08 and tv_full < tv_topk / 2.5, (tv_topk, tv_full)
    assert np.all((b.tail_estimate >= 0) & (b.tail_estimate < 1))
    np.testing.assert_allclose(b.probs.sum(axis=1), 1.0, atol=1e-9)
    assert a.tail_estimate is None
    # the same top-k; the bound is now a certificate (IVF at 20k slots: it was an estimate)
    assert a.ids.tolist() == b.ids.tolist()
    assert b.exact_bound and not a.exact_bound
    # a lone query gets its row of the batch
    one = full.query(q[3], k=32)
    np.testing.assert_allclose(one.probs, b.probs[3:4], atol=1e-12)


def answers(mem):
    res = mem.query(QUERIES, k=8)
    return res.classes.tolist(), res.probs, res.tail_estimate


def same_slots_fresh(mem: Memory) -> Memory:
    slots = mem.get(mem.ids())
    fresh = Memory(DIM, temperature=mem.temperature, probs="full")
    fresh.add(slots.vectors, slots.labels, ids=slots.ids, weights=slots.weights)
    return fresh


def test_summaries_follow_adds_removes_compaction_and_reopen(rng, tmp_path):
    """After every change the estimate must be that of a memory freshly built from the
    same slots (summaries kept up to date, not left stale)."""
    x, y = clustered(3000, DIM, n_classes=12, seed=7)
    mem = Memory(DIM, temperature=0.1, probs="full", path=tmp_path / "m")
    ids = mem.add(x[:2000], y[:2000], weights=rng.uniform(0.5, 2.0, 2000))
    answers(mem)  # the summaries now exist and must be kept up to date from here on

    def check():
        got, want = answers(mem), answers(same_slots_fresh(mem))
        assert got[0] == want[0]
        np.testing.assert_allclose(got[1], want[1], atol=1e-9)
        np.testing.assert_allclose(got[2], want[2], atol=1e-9)

    mem.remove(ids[y[:2000] == 3])  # a whole class goes
    check()
    mem.add(x[2000:], y[2000:])
    mem.remove(ids[y[:2000] != 3][::7][:100])
    check()
    mem.compact(budget=500)
    check()
    before = answers(mem)
    mem.close()
    again = Memory.open(tmp_path / "m")
    after = answers(again)
    assert after[0] == before[0]
    np.testing.assert_allclose(after[1], before[1], atol=1e-9)


def test_probs_option_is_checked_and_kept(tmp_path):
    with pytest.raises(engine.InvalidValueError, match="probs"):
        Memory(DIM, probs="all")
    mem = Memory(DIM, probs="full", path=tmp_path / "m")
    mem.add(QUERIES, np.arange(len(QUERIES)) % 3)
    mem.close()
    assert Memory.open(tmp_path / "m").query(QUERIES[0]).tail_estimate is not None
    fresh = Memory(DIM)  # the default: probabilities of attention over the whole memory
    fresh.add(QUERIES, np.arange(len(QUERIES)) % 3)
    assert fresh.query(QUERIES[0], k=2).tail_estimate is not None
    assert fresh.query(QUERIES[0], k=2, probs="top-k").tail_estimate is None


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


CERTIFIED = {"Flat": {}, "IVF-Flat": {"index": "IVF32,Flat", "nprobe": 2}, "HNSW": {"index": "HNSW8"},
             "IVF-PQ rescored": {"index": "IVF32,PQ4x4", "nprobe": 2},
             "inner product": {"index": "IVF32,Flat", "nprobe": 2, "metric": "ip"}}


@pytest.mark.parametrize("case", CERTIFIED, ids=list(CERTIFIED))
@pytest.mark.parametrize("temperature", [0.02, 0.2])
def test_the_certificate_bounds_the_true_omitted_mass(rng, case, temperature):
    """With summaries, tail_bound is a certificate on every index that scores exactly,
    approximate search included: at or above the attention mass dense float64 attention
    puts outside the slots returned."""
    opts = dict(CERTIFIED[case])
    metric = opts.get("metric", "cosine")
    x, y = clustered(12_000, DIM, n_classes=30, seed=5)
    if metric == "ip":
        x = x * rng.uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)
    mem = Memory(DIM, temperature=temperature, probs="full", **opts)
    ids = mem.add(x, y, weights=rng.uniform(0.5, 2.0, len(x)))
    mem.remove(ids[::10])  # the groups must forget removed slots' mass
    q = x[rng.integers(0, len(x), 60)] + 0.3 * rng.standard_normal((60, DIM)).astype(np.float32)
    res = mem.query(q, k=16)
    assert res.exact_bound
    slots = mem.get(mem.ids())
    a_full, _ = dense_reference(slots.vectors, np.array(slots.labels), slots.weights, q, res.classes,
                                temperature, metric=metric)
    col = np.searchsorted(slots.ids, res.ids)
    omitted = 1 - np.take_along_axis(a_full, col, axis=1).sum(axis=1)
    assert (omitted <= res.tail_bound + 1e-6).all(), (omitted - res.tail_bound).max()


def test_the_certificate_shows_a_small_tail_where_the_old_bound_could_not(rng):
    """Well separated classes of 40 slots, k = 32: little mass outside the top-k, which the
    worst-case bound (every omitted slot at s_k) cannot see and the summaries can."""
    x, y = clustered(4000, DIM, n_classes=100, seed=8, class_spread=2.0, noise=0.2, modes=1)
    mem = Memory(DIM, temperature=0.05, probs="full")
    mem.add(x, y)
    q = x[:100] + 0.05 * rng.standard_normal((100, DIM)).astype(np.float32)
    res_old, res = mem.query(q, k=32, probs="top-k"), mem.query(q, k=32)
    a_full, _ = dense_reference(x, y, np.ones(len(y)), q, res.classes, 0.05)
    omitted = 1 - np.take_along_axis(a_full, res.ids, axis=1).sum(axis=1)
    assert (omitted <= res.tail_bound + 1e-6).all()
    assert np.median(res_old.tail_bound) > 0.9 and np.median(res.tail_bound) < 0.4, \
        (np.median(omitted), np.median(res.tail_bound), np.median(res_old.tail_bound))


def test_tail_target_grows_k_by_the_estimate_when_estimating(rng):
    x, y = clustered(20_000, DIM, n_classes=40, seed=3)
    mem = Memory(DIM, temperature=0.05, probs="full")
    mem.add(x, y)
    q = x[rng.integers(0, len(x), 50)] + 0.2 * rng.standard_normal((50, DIM)).astype(np.float32)
    res = mem.query(q, k=16, tail=0.2)
    assert (res.tail_estimate <= 0.2).all() and res.k > 16
    assert res.k < len(mem)  # met well before the whole memory
    _, ref = dense_reference(x, y, np.ones(len(y)), q, res.classes, 0.05)
    assert total_variation(res.probs, ref).mean() < total_variation(mem.query(q, k=16).probs, ref).mean()


def test_stats_count_the_summaries_once_built():
    x, y = clustered(6000, DIM, n_classes=12, seed=4)
    mem = Memory(DIM, probs="full")
    mem.add(x, y)
    before = mem.stats()
    assert before.bytes_tail == 0
    mem.query(QUERIES)
    after = mem.stats()
    # a group per (cell, class): at least its count, mass, sums, pivot and reach
    assert after.bytes_tail >= 12 * (8 + 8 + 8 * DIM + 4 * DIM + 8)
    assert after.bytes_total == before.bytes_total + after.bytes_tail
