"""Top-k attention against exact dense attention (float64, all slots)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import Memory
from engine.attention import attend, attend_torch, class_probs, top_class
from engine.testing import dense_attention, omitted_mass, slot_attention, total_variation


def make_memory(rng, n, dim, n_classes, temperature, weighted):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    # pull half the queries' neighbourhoods together so attention is not uniform
    y = rng.integers(0, n_classes, n)
    w = rng.uniform(0.5, 3.0, n) if weighted else np.ones(n)
    mem = Memory(dim, index="Flat", temperature=temperature)
    mem.add(x, y, weights=w)
    q = x[rng.integers(0, n, 40)] + 0.3 * rng.standard_normal((40, dim)).astype(np.float32)
    return mem, x, y, w, q


@pytest.mark.parametrize("temperature", [0.01, 0.03, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_topk_within_tail_bound_of_full_attention(rng, temperature, weighted):
    mem, x, y, w, q = make_memory(rng, 3000, 24, 7, temperature, weighted)
    res = mem.query(q, k=32)
    assert res.exact_bound
    p_full = dense_attention(x, y, q, temperature=temperature, weights=w, classes=res.classes)
    tv = total_variation(res.probs, p_full)
    assert (tv <= res.tail_bound + 1e-6).all(), (tv - res.tail_bound).max()
    # the bound is also a bound on the attention mass left out (ids are rows of x)
    omitted = omitted_mass(x, q, res.ids, temperature=temperature, weights=w)
    assert (omitted <= res.tail_bound + 1e-6).all()


@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_adaptive_tail_meets_target(rng, temperature):
    mem, x, y, w, q = make_memory(rng, 2000, 16, 5, temperature, weighted=True)
    res = mem.query(q, k=8, tail=1e-4)
    p_full = dense_attention(x, y, q, temperature=temperature, weights=w, classes=res.classes)
    assert (res.tail_bound <= 1e-4).all()
    assert (total_variation(res.probs, p_full) <= 1e-4).all()
    # attention over the used slots matches the full attention restricted to them
    a_full = slot_attention(x, q, temperature=temperature, weights=w)
    for i in range(len(q)):
        used = res.ids[i] >= 0
        ref = a_full[i, res.ids[i][used]]
        # FAISS scores are float32: a relative error of ~1e-7 / T in the logits
        np.testing.assert_allclose(res.attention[i][used], ref / ref.sum(), rtol=2e-5 / temperature, atol=1e-12)


def test_all_slots_used_gives_zero_bound_and_exact_probs(rng):
    mem, x, y, w, q = make_memory(rng, 200, 8, 4, 0.1, weighted=True)
    res = mem.query(q, k=10_000)
    assert res.k == 200 and res.k_clamped
    assert (res.tail_bound == 0).all()
    p_full = dense_attention(x, y, q, temperature=0.1, weights=w, classes=res.classes)
    np.testing.assert_allclose(res.probs, p_full, atol=1e-6)  # float32 scores


def test_tiny_temperature_does_not_overflow(rng):
    mem, x, y, w, q = make_memory(rng, 500, 8, 3, 1e-4, weighted=False)
    res = mem.query(q, k=16)
    assert np.isfinite(res.probs).all() and np.isfinite(res.tail_bound).all()
    np.testing.assert_allclose(res.probs.sum(axis=1), 1.0, atol=1e-9)


def test_numpy_kernel_handles_padding():
    scores = np.array([[0.9, 0.5, 0.0]], np.float32)
    out = attend(scores, np.ones((1, 3)), np.array([[0, 1, -1]]), n_classes=2, temperature=1.0,
                 omitted_weight=np.zeros(1))
    e = np.exp([0.9, 0.5])
    np.testing.assert_allclose(out.attention[0], [e[0] / e.sum(), e[1] / e.sum(), 0.0])
    assert out.tail_bound[0] == 0.0


def test_torch_path_matches_numpy_and_has_gradients(rng):
    n, k, c = 6, 12, 4
    s = rng.uniform(-1, 1, (n, k))
    w = rng.uniform(0.5, 2, (n, k))
    cls = rng.integers(0, c, (n, k))
    cls[0, -2:] = -1  # padding
    ref = attend(s, w, cls, n_classes=c, temperature=0.2, omitted_weight=np.zeros(n)).probs
    st = torch.tensor(s, requires_grad=True)
    logp = attend_torch(st, torch.tensor(w), torch.tensor(cls), n_classes=c, temperature=0.2)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(logp.detach().numpy(), np.log(ref), atol=1e-10)
    # NLL on log-probabilities; gradients are finite even for classes with no slot
    loss = -logp[torch.arange(n), torch.tensor(cls[:, 0])].mean()
    loss.backward()
    assert torch.isfinite(st.grad).all()
    temp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    present = torch.tensor(cls[:, :1])  # a class each row has a slot of, so log p is finite
    assert torch.autograd.gradcheck(
        lambda a, t: attend_torch(a, torch.tensor(w), torch.tensor(cls), n_classes=c, temperature=t).gather(1, present),
        (torch.tensor(s, requires_grad=True), temp),
    )


@pytest.mark.parametrize("n,c", [(5, 40), (300, 5000)], ids=["dense-sum", "sorted-runs"])
def test_top_class_is_the_argmax_of_class_probs(rng, n, c):
    """Both ways of finding the top class (dense sums, sorted runs for many classes) agree with argmax."""
    k = 32
    cls = rng.integers(0, 7, (n, k)) * (c // 7)  # few distinct classes per row, so runs repeat
    cls[::3, -4:] = -1  # padding
    att = rng.dirichlet(np.ones(k), n) * (cls >= 0)
    att[:, 0] = att[:, 1] = 0.4  # exact ties between two classes in some rows
    probs = class_probs(att, cls, c)
    np.testing.assert_array_equal(top_class(att, cls, c), np.argmax(probs, axis=1))


def test_unit_weights_shortcut_matches_explicit_weights(rng):
    s = np.sort(rng.uniform(-1, 1, (20, 16)), axis=1)[:, ::-1]
    cls = rng.integers(0, 5, (20, 16))
    a = attend(s, None, cls, n_classes=5, temperature=0.05, omitted_weight=np.full(20, 100.0))
    b = attend(s, np.ones((20, 16)), cls, n_classes=5, temperature=0.05, omitted_weight=np.full(20, 100.0))
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-14)
    np.testing.assert_allclose(a.tail_bound, b.tail_bound, atol=1e-14)


def test_query_labels_with_many_classes_match_dense_reference(rng):
    """A memory of 3,000 classes answers 100 queries through the sorted-runs path."""
    x = rng.standard_normal((6000, 16)).astype(np.float32)
    y = np.arange(6000) % 3000
    mem = Memory(16, index="Flat", temperature=0.05, probs="top-k")
    mem.add(x, y)
    q = x[:100] + 0.1 * rng.standard_normal((100, 16)).astype(np.float32)
    res = mem.query(q, k=32)
    # reference: float64 brute-force top-32, softmax, mass per class
    mass = dense_attention(x, y, q, temperature=0.05, classes=np.arange(3000), k=32)
    np.testing.assert_array_equal(res.labels, np.argmax(mass, axis=1))
    np.testing.assert_allclose(res.probs.max(axis=1), mass.max(axis=1), atol=1e-5)


LONE_QUERY_CASES = {
    "Flat": dict(index="Flat"),
    "Flat, weighted": dict(index="Flat", weighted=True),
    "Flat, a class removed": dict(index="Flat", drop_class=True),
    "inner product, weighted": dict(index="Flat", metric="ip", weighted=True),
    "IVF-PQ rescored": dict(index="IVF8,PQ4x4", weighted=True),
    "IVF-PQ codes only": dict(index="IVF8,PQ4x4", rescore=False),
    "HNSW": dict(index="HNSW8"),
}


@pytest.mark.parametrize("case", LONE_QUERY_CASES, ids=list(LONE_QUERY_CASES))
@pytest.mark.parametrize("temperature", [0.01, 0.3])
def test_a_lone_query_gets_its_row_of_a_batch(rng, case, temperature):
    """One query takes a shorter path than a batch: it must give the same answer, and on an
    exact index its bound must hold against dense float64 attention."""
    opts = dict(LONE_QUERY_CASES[case])
    weighted, drop_class = opts.pop("weighted", False), opts.pop("drop_class", False)
    n, dim = 2000, 16
    x = rng.standard_normal((n, dim)).astype(np.float32)
    y = rng.integers(0, 9, n)
    w = rng.uniform(0.2, 5.0, n) if weighted else np.ones(n)
    mem = Memory(dim, temperature=temperature, **opts)
    ids = mem.add(x, y, weights=w)
    if drop_class:  # label indices are then no longer the columns of probs
        keep = y != 4
        mem.remove(ids[~keep])
        x, y, w, ids = x[keep], y[keep], w[keep], ids[keep]
    q = x[:6] + 0.2 * rng.standard_normal((6, dim)).astype(np.float32)
    batch = mem.query(q, k=24)
    for i in range(len(q)):
        one = mem.query(q[i], k=24)
        assert one.ids.tolist() == batch.ids[i:i + 1].tolist()
        assert one.labels.tolist() == batch.labels[i:i + 1].tolist()
        np.testing.assert_allclose(one.attention, batch.attention[i:i + 1], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(one.probs, batch.probs[i:i + 1], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(one.tail_bound, batch.tail_bound[i:i + 1], rtol=1e-9, atol=1e-300)
        assert one.classes.tolist() == batch.classes.tolist() and one.exact_bound == batch.exact_bound
    if mem.stats().exact:
        metric = opts.get("metric", "cosine")
        p_full = dense_attention(x, y, q, temperature=temperature, metric=metric, weights=w, classes=batch.classes)
        for i in range(len(q)):
            one = mem.query(q[i], k=24)
            omitted = omitted_mass(x, q[i], one.ids, temperature=temperature, metric=metric, weights=w, ids=ids)
            assert omitted[0] <= one.tail_bound[0] + 1e-6  # float32 scores
            assert total_variation(one.probs, p_full[i:i + 1])[0] <= one.tail_bound[0] + 1e-6
