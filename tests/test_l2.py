"""metric="l2": attention over negative squared Euclidean distance, checked against dense
float64 attention and brute-force search (engine.testing), on every index kind, through
persistence, compaction, the temperature choice, sharding and serving.

A lifted score carries |q|^2, so the float32 references here use vectors a few units long
and tolerances of float32 rounding at that scale.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import Client, Memory
from engine.data import clustered
from engine.errors import DimensionError, InvalidValueError
from engine.serve import MemoryServer
from engine.testing import brute_force_topk, slot_attention, total_variation

from .tail.test_tail import omitted, reference

DIM = 16


@pytest.fixture(scope="module")
def blobs():
    """Isotropic Gaussian classes of unnormalised vectors (norms about 3 to 8)."""
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 1.5, (12, DIM))
    y = rng.integers(0, 12, 6000)
    x = (centres[y] + rng.normal(0, 0.8, (len(y), DIM))).astype(np.float32)
    yq = rng.integers(0, 12, 200)
    q = (centres[yq] + rng.normal(0, 0.8, (len(yq), DIM))).astype(np.float32)
    return x, y, q, yq


@pytest.mark.parametrize("index", ["Flat", "IVF32,Flat", "HNSW16", "IVF32,PQ8"])
def test_top_k_attention_is_dense_attention_over_the_nearest_slots(blobs, index):
    x, y, q, _ = blobs
    # calibrated for recall (the default target, the answer, may probe fewer lists)
    mem = Memory(DIM, metric="l2", index=index, temperature=2.0, recall=None if index == "Flat" else 0.98)
    mem.add(x, y, weights=np.linspace(0.5, 2.0, len(x)))
    res = mem.query(q, k=32)
    top, _ = brute_force_topk(x, q, 32, metric="l2")
    found = np.mean([len(set(res.ids[i]) & set(top[i])) / 32 for i in range(len(q))])
    assert found >= (1.0 if index == "Flat" else 0.95), found
    assert (omitted(mem, q, res) <= res.tail_bound + 1e-6).all()  # the bound covers what was left out
    # attention within the returned slots is the dense one renormalised (rescored exactly for PQ)
    slots = mem.get(mem.ids())
    a = slot_attention(slots.vectors, q, temperature=mem.temperature, metric="l2", weights=slots.weights)
    col = np.searchsorted(slots.ids, np.maximum(res.ids, 0))
    want = np.where(res.ids >= 0, np.take_along_axis(a, col, 1), 0.0)
    np.testing.assert_allclose(res.attention, want / want.sum(1, keepdims=True), atol=2e-5)


@pytest.mark.parametrize("index", ["Flat", "IVF32,Flat"])
def test_full_answers_of_exact_routes_are_dense_attention(blobs, index):
    x, y, q, _ = blobs
    mem = Memory(DIM, metric="l2", index=index, temperature=2.0, probs="full")
    mem.add(x, y)
    res = mem.query(q)
    p = reference(mem, q)
    tv = total_variation(res.probs, p)
    assert (tv <= np.maximum(res.tail_bound, res.tail_estimate) + 1e-5).all()
    if index == "Flat":
        assert (res.tail_bound == 0).all() and tv.max() < 1e-5


def test_the_estimated_rest_follows_each_cells_spread():
    """HNSW scores its top-k; the rest of isotropic data is estimated by a Gaussian per cell.
    A first-order estimate (each cell at its mean) misses most of it at this temperature."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (3000, DIM)).astype(np.float32)
    y = rng.integers(0, 10, len(x))
    q = rng.normal(0, 2, (100, DIM)).astype(np.float32)
    mem = Memory(DIM, metric="l2", index="HNSW32", temperature=5.0, probs="full")
    mem.add(x, y)
    res = mem.query(q, k=64)
    p = reference(mem, q)
    truth = omitted(mem, q, res)
    assert truth.mean() > 0.02  # a tail that matters
    assert total_variation(res.probs, p).mean() < 0.02
    assert abs(res.tail_estimate.mean() - truth.mean()) < 0.5 * truth.mean()


def test_vectors_are_kept_as_written_through_a_reopen_and_codes(blobs, tmp_path):
    x, y, q, _ = blobs
    for name, opts in [("flat", {"index": "Flat"}), ("codes", {"index": "IVF16,SQ8", "rescore": False})]:
        mem = Memory(DIM, metric="l2", path=tmp_path / name, temperature=2.0, **opts)
        ids = mem.add(x[:3000], y[:3000])
        mem.save()
        mem.add(x[3000:], y[3000:])  # in the log after the snapshot
        before = mem.query(q, k=16)
        got = mem.get(ids[:50]).vectors
        mem.close()
        again = Memory.open(tmp_path / name)
        assert again.metric == "l2" and again.get(ids[:50]).vectors.shape == (50, DIM)
        np.testing.assert_allclose(again.get(ids[:50]).vectors, got, atol=0)
        if name == "flat":
            np.testing.assert_array_equal(got, x[:50])
        after = again.query(q, k=16)
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_allclose(after.probs, before.probs, atol=1e-6)
        again.close()


def test_compaction_keeps_every_class_mass_and_answers_close_to_dense(blobs):
    x, y, q, yq = blobs
    mem = Memory(DIM, metric="l2", index="Flat", temperature=2.0)
    mem.add(x, y, weights=np.linspace(1, 3, len(x)))
    mass = {c: float(np.linspace(1, 3, len(x))[y == c].sum()) for c in range(12)}
    full_acc = float(np.mean(mem.classes()[mem.query(q).labels] == yq))
    mem.compact(budget=240)
    slots = mem.get(mem.ids())
    assert len(slots.ids) <= 240
    for c in range(12):
        assert np.isclose(slots.weights[np.array(slots.labels) == c].sum(), mass[c], rtol=1e-9)
    acc = float(np.mean(mem.classes()[mem.query(q).labels] == yq))
    assert acc >= full_acc - 0.05, (acc, full_acc)


def test_distill_learns_under_squared_distance(blobs):
    pytest.importorskip("torch")
    x, y, q, yq = blobs
    mem = Memory(DIM, metric="l2", index="Flat", temperature=2.0)
    mem.add(x, y)
    report = mem.compact(budget=48, policy="distill", steps=30, queries=2000)
    assert report.slots <= 48
    assert np.mean(mem.classes()[mem.query(q).labels] == yq) > 0.8


def test_the_temperature_chosen_scales_with_squared_distances():
    """Scaling every vector by s scales squared distances by s^2: the choice follows, and the
    answers are the same."""
    x, y, q, _ = clustered(3000, DIM, n_classes=20, seed=4, queries=100)
    chosen = []
    for s in (1.0, 10.0):
        mem = Memory(DIM, metric="l2", index="Flat")
        mem.add(x * s, y)
        chosen.append((mem.temperature, mem.query(q * s).labels))
    assert np.isclose(chosen[1][0] / chosen[0][0], 100.0, rtol=0.05), chosen
    assert np.mean(chosen[0][1] == chosen[1][1]) > 0.98


def test_bad_input_is_refused_and_changes_nothing(blobs):
    x, y, _, _ = blobs
    mem = Memory(DIM, metric="l2", index="Flat")
    mem.add(x[:100], y[:100])
    for bad, err in [(np.full((1, DIM), 2e7, np.float32), InvalidValueError),
                     (np.full((1, DIM), np.nan, np.float32), InvalidValueError),
                     (np.ones((1, DIM + 1), np.float32), DimensionError)]:
        with pytest.raises(err):
            mem.add(bad, [0])
        with pytest.raises(err):
            mem.query(bad)
    assert len(mem) == 100
    with pytest.raises(InvalidValueError, match="metric"):
        Memory(DIM, metric="euclid")
    with pytest.raises(InvalidValueError, match="PQ5"):  # 5 does not divide 16
        Memory(DIM, metric="l2", index="IVF4,PQ5")
    Memory(DIM, metric="l2", index="IVF4,PQ8")  # the slots' own dimension is what PQ splits


def test_served_l2_memory_answers_as_embedded(blobs):
    x, y, q, _ = blobs
    mem = Memory(DIM, metric="l2", index="Flat", temperature=2.0)
    mem.add(x[:1000], y[:1000])
    server = MemoryServer({"m": mem}, "grpc://127.0.0.1:0", open_reads=True)
    try:
        with Client(f"grpc://127.0.0.1:{server.port}", "m") as c:
            got = c.query(q[:5], k=16)
            want = mem.query(q[:5], k=16)
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_allclose(got.probs, want.probs, atol=1e-9)
            one = c.query(q[0], k=16)  # a single query takes the small-query action
            np.testing.assert_array_equal(one.ids[0], want.ids[0])
    finally:
        server.shutdown()


@pytest.mark.parametrize("offset", [0.0, 3000.0, 1e5])
def test_far_from_the_origin_it_answers_as_near_it(offset):
    """Squared distances do not change when every vector moves: neither may the answers, the
    certificate or the temperature chosen (the memory centres itself on its first slots)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 2000)
    base = rng.normal(0, 1, (2000, DIM)) + rng.normal(0, 1, (5, DIM))[y]  # classes that overlap
    qb = rng.normal(0, 1, (40, DIM))
    x, q = (base + offset).astype(np.float32), (qb + offset).astype(np.float32)
    for probs in ("top-k", "full"):
        mem = Memory(DIM, metric="l2", index="Flat", temperature=0.5, probs=probs)
        mem.add(x, y)
        res = mem.query(q, k=4)
        p = reference(mem, q)
        assert res.exact_bound
        if probs == "top-k":  # a full answer on Flat scores every slot: its bound is 0
            assert (omitted(mem, q, res) <= res.tail_bound + 1e-9).all()
        truth = -np.stack([((x[res.ids[i]].astype(np.float64) - q[i]) ** 2).sum(1) for i in range(len(q))])
        np.testing.assert_allclose(res.scores, truth, rtol=1e-4, atol=1e-3)  # scores are -|q - x|^2 itself
        if probs == "full":
            assert total_variation(res.probs, p).max() < 1e-5
    auto = Memory(DIM, metric="l2", index="Flat")
    auto.add(x, y)
    near = Memory(DIM, metric="l2", index="Flat")
    near.add(base.astype(np.float32), y)
    assert np.isclose(auto.temperature, near.temperature, rtol=0.02), (auto.temperature, near.temperature)


def test_the_centre_is_kept_and_vectors_come_back_as_written(tmp_path):
    rng = np.random.default_rng(2)
    x = (rng.normal(0, 1, (500, DIM)) + 500).astype(np.float32)
    mem = Memory(DIM, metric="l2", index="Flat", path=tmp_path / "m", temperature=1.0)
    ids = mem.add(x, rng.integers(0, 3, 500))
    before = mem.query(x[:5] + 0.1, k=8)
    got = mem.get(ids).vectors
    # exact wherever the centred value is (every coordinate within 2x of the centre: all here)
    np.testing.assert_array_equal(got, x)
    mem.save()
    mem.close()
    again = Memory.open(tmp_path / "m")
    np.testing.assert_array_equal(again.get(ids).vectors, x)
    after = again.query(x[:5] + 0.1, k=8)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.probs, before.probs, atol=1e-9)
    again.close()
    with pytest.raises(InvalidValueError, match="centre"):
        Memory(DIM, metric="cosine", centre=np.zeros(DIM))
    with pytest.raises(InvalidValueError, match="centre"):
        Memory(DIM, metric="l2", centre=np.zeros(DIM + 1))


def test_probed_lists_are_not_counted_twice_at_a_flat_temperature():
    """IVF-Flat scans whole lists; the Gaussian estimate is of what scored below the k-th, so
    only the scanned slots beyond the top-k may be taken off it (at a high temperature the
    answer is nearly the class masses, and a class in the probed list must not gain)."""
    rng = np.random.default_rng(24)
    centres = rng.normal(0, 2, (6, 8))
    y = rng.integers(0, 6, 3000)
    x = (centres[y] + rng.normal(0, 1, (3000, 8))).astype(np.float32)
    q = (centres[rng.integers(0, 6, 30)] + rng.normal(0, 1, (30, 8))).astype(np.float32)
    for t, within in ((10.0, 0.02), (1000.0, 0.01)):
        mem = Memory(8, metric="l2", index="IVF16,Flat", nprobe=1, temperature=t, probs="full")
        mem.add(x, y)
        p = reference(mem, q)
        assert total_variation(mem.query(q, k=16).probs, p).mean() < within, t
