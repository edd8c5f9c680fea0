"""References to test memories against, and the contract every memory must keep.

The references are plain float64 numpy over every slot: no FAISS, no top-k search, nothing
from engine's own attention, metric or index code, so a bug there cannot hide in the
reference too.

- :func:`dense_attention`: class probabilities of softmax attention over every slot
  (Matching Networks eq. 1 with slot masses), or over each query's exact top-k (``k=``);
- :func:`slot_attention`: the attention each slot gets, (n_queries, n_slots);
- :func:`omitted_mass`: the true attention share of the slots outside a given set (what
  ``QueryResult.tail_bound`` must bound, and ``tail_estimate`` estimates);
- :func:`brute_force_topk`: exact top-k rows and scores;
- :func:`total_variation`: per-row total-variation distance of two distributions.

Scores: ``"cosine"`` (vectors and queries L2-normalised, then the inner product), ``"ip"``
(inner product) and ``"l2"`` (``-|q - x|^2``, each computed as a difference, never by the
expansion ``|q|^2 - 2 q.x + |x|^2`` that cancels digits). Logits are ``score / T + log w``.
Queries are taken in chunks, so ``dense_attention`` and ``omitted_mass`` hold at most a few
million float64 scores at a time whatever the memory's size (only :func:`slot_attention`
returns a whole (n, N) matrix).

:class:`MemoryContract` is a pytest base class: its tests run through a memory's public API
only (:class:`engine.protocol.MemoryLike`), so one subclass per implementation
(``Memory``, ``Client``, ``ShardedMemory``, ...) checks that it answers the same writes
the same way, against these references. pytest is a development dependency: this module
imports it only inside the contract's test methods, so ``import engine.testing`` (and the
references) work without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import numpy.typing as npt

from .errors import InvalidValueError

if TYPE_CHECKING:
    from .protocol import MemoryLike
    from .results import QueryResult

__all__ = [
    "MemoryContract",
    "brute_force_topk",
    "dense_attention",
    "omitted_mass",
    "slot_attention",
    "total_variation",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

METRICS = ("cosine", "ip", "l2")
# float64 scores held at once (32 MB): the queries are taken in chunks of this many / n_slots
CHUNK_SCORES = 1 << 22


# -- the references ------------------------------------------------------------------------
def _rows(x: npt.ArrayLike, name: str) -> FloatArray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise InvalidValueError(f"{name} must be (n, dim) or (dim,), got shape {a.shape}")
    return a


def _prepared(vectors: npt.ArrayLike, queries: npt.ArrayLike, metric: str) -> tuple[FloatArray, FloatArray]:
    """(slots, queries) as float64 rows, L2-normalised for cosine."""
    if metric not in METRICS:
        raise InvalidValueError(f"metric must be one of {METRICS}, got {metric!r}")
    z, q = _rows(vectors, "vectors"), _rows(queries, "queries")
    if len(z) == 0:
        raise InvalidValueError("no slots: attention over an empty memory is undefined")
    if z.shape[1] != q.shape[1]:
        raise InvalidValueError(f"vectors have {z.shape[1]} dimensions but queries {q.shape[1]}")
    if metric == "cosine":
        nz, nq = np.linalg.norm(z, axis=1, keepdims=True), np.linalg.norm(q, axis=1, keepdims=True)
        if (nz == 0).any() or (nq == 0).any():
            raise InvalidValueError("a zero vector has no cosine similarity")
        z, q = z / nz, q / nq
    return z, q


def _scores(z: FloatArray, q: FloatArray, metric: str) -> FloatArray:
    """(len(q), len(z)) similarities of prepared rows."""
    if metric == "l2":  # each distance as a difference: no cancellation
        out = np.empty((len(q), len(z)))
        for i, row in enumerate(q):
            out[i] = -((z - row) ** 2).sum(axis=1)
        return out
    return q @ z.T


def _chunks(n_queries: int, n_slots: int) -> Iterator[slice]:
    step = max(1, CHUNK_SCORES // max(n_slots, 1))
    for lo in range(0, n_queries, step):
        yield slice(lo, min(lo + step, n_queries))


def _log_weights(weights: npt.ArrayLike | None, n: int) -> FloatArray:
    if weights is None:
        return np.zeros(n)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (n,):
        raise InvalidValueError(f"{n} slots but {w.size} weights")
    if not (w > 0).all() or not np.isfinite(w).all():
        raise InvalidValueError("weights must be finite and > 0")
    return np.log(w)


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (np.isfinite(t) and t > 0):
        raise InvalidValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _attention_chunks(z: FloatArray, q: FloatArray, temperature: float, metric: str, log_w: FloatArray,
                      k: int | None) -> Iterator[tuple[slice, FloatArray]]:
    """(rows of q, their (rows, N) attention): softmax of score / T + log w over every slot,
    or over each query's exact top-k by score (the rest 0)."""
    for rows in _chunks(len(q), len(z)):
        s = _scores(z, q[rows], metric)
        logits = s / temperature + log_w[None, :]
        if k is not None and k < len(z):
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            keep = np.zeros(s.shape, dtype=bool)
            np.put_along_axis(keep, top, True, axis=1)
            logits = np.where(keep, logits, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        a = np.exp(logits)
        a /= a.sum(axis=1, keepdims=True)
        yield rows, a


def _check_k(k: int | None) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InvalidValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _columns(labels: npt.ArrayLike, classes: npt.ArrayLike | None, n: int) -> tuple[np.ndarray, IntArray]:
    """(classes, each slot's column in classes); classes default to the sorted unique labels."""
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise InvalidValueError(f"{n} slots but labels of shape {lab.shape}")
    cls = np.unique(lab) if classes is None else np.asarray(classes).reshape(-1)
    index = {c: i for i, c in enumerate(cls.tolist())}
    if len(index) != len(cls):
        raise InvalidValueError("classes must be distinct")
    uniq, inverse = np.unique(lab, return_inverse=True)
    try:
        col_of = np.array([index[u] for u in uniq.tolist()], dtype=np.int64)
    except KeyError as exc:
        raise InvalidValueError(f"label {exc.args[0]!r} is not among classes: its mass would be lost") from None
    return cls, col_of[inverse.reshape(-1)]


def dense_attention(vectors: npt.ArrayLike, labels: npt.ArrayLike, queries: npt.ArrayLike, *, temperature: float,
                    metric: str = "cosine", weights: npt.ArrayLike | None = None,
                    classes: npt.ArrayLike | None = None, k: int | None = None) -> FloatArray:
    """Class probabilities of softmax attention over every slot, float64.

    p(c | q) = sum over slots i of label c of softmax_i(score(q, x_i) / T + log w_i).

    Args:
        vectors: (N, dim) slots as written (normalised here for cosine).
        labels: (N,) their labels (int or str).
        queries: (n, dim), or (dim,) for one query.
        temperature: T > 0.
        metric: "cosine", "ip" or "l2" (see the module's docstring).
        weights: (N,) slot masses > 0 (default 1).
        classes: the columns of the answer, in order (default: the sorted unique labels).
            Every label must be among them; a class without a slot gets probability 0.
        k: attend over each query's exact top-k slots by score (ties: the lower row first,
            as :func:`brute_force_topk`) renormalised, instead of every slot: what a
            top-k answer of an exact index must be. None (default) or k >= N: every slot.

    Returns:
        (n, C) float64, rows summing to 1, columns in ``classes`` order.
    """
    z, q = _prepared(vectors, queries, metric)
    t, k = _check_temperature(temperature), _check_k(k)
    log_w = _log_weights(weights, len(z))
    cls, col = _columns(labels, classes, len(z))
    order = np.argsort(col, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(col[order]) != 0])
    present = col[order][starts]
    out = np.zeros((len(q), len(cls)))
    for rows, a in _attention_chunks(z, q, t, metric, log_w, k):
        part = out[rows]  # a view: filled in place
        part[:, present] = np.add.reduceat(a[:, order], starts, axis=1)
    return out


def slot_attention(vectors: npt.ArrayLike, queries: npt.ArrayLike, *, temperature: float, metric: str = "cosine",
                   weights: npt.ArrayLike | None = None, k: int | None = None) -> FloatArray:
    """(n, N) the attention each slot gets from each query (rows sum to 1), float64: the
    weights :func:`dense_attention` sums per class. ``k`` as there (0 outside the top-k).
    Holds the whole matrix: for large memories prefer :func:`dense_attention` and
    :func:`omitted_mass`, which work in chunks."""
    z, q = _prepared(vectors, queries, metric)
    t, k = _check_temperature(temperature), _check_k(k)
    log_w = _log_weights(weights, len(z))
    out = np.empty((len(q), len(z)))
    for rows, a in _attention_chunks(z, q, t, metric, log_w, k):
        out[rows] = a
    return out


def omitted_mass(vectors: npt.ArrayLike, queries: npt.ArrayLike, kept: npt.ArrayLike, *, temperature: float,
                 metric: str = "cosine", weights: npt.ArrayLike | None = None,
                 ids: npt.ArrayLike | None = None) -> FloatArray:
    """(n,) the true share of each query's full attention (over every slot) on the slots
    NOT in its row of ``kept``, float64 (summed over those slots, not as 1 - kept, so tiny
    shares keep their digits).

    Args:
        kept: (n, m) per query, the slots it kept (e.g. ``QueryResult.ids``); -1 is padding.
        ids: (N,) the id of each slot (row of ``vectors``), when ``kept`` holds ids; None
            when ``kept`` holds rows. Every kept id must be one of them.
        Others as :func:`dense_attention`.
    """
    z, q = _prepared(vectors, queries, metric)
    t = _check_temperature(temperature)
    log_w = _log_weights(weights, len(z))
    held = np.asarray(kept, dtype=np.int64)
    if held.ndim == 1 and len(q) == 1:
        held = held[None, :]
    if held.ndim != 2 or len(held) != len(q):
        raise InvalidValueError(f"kept must be (n_queries, m) = ({len(q)}, m), got shape {held.shape}")
    valid = held >= 0
    if ids is None:
        rows_of = held
        if (held >= len(z)).any():
            raise InvalidValueError(f"kept rows must be < {len(z)}")
    else:
        slot_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if slot_ids.shape != (len(z),):
            raise InvalidValueError(f"{len(z)} slots but {slot_ids.size} ids")
        sorter = np.argsort(slot_ids, kind="stable")
        pos = np.minimum(np.searchsorted(slot_ids[sorter], held), len(z) - 1)
        rows_of = sorter[pos]
        missing = valid & (slot_ids[rows_of] != held)
        if missing.any():
            raise InvalidValueError(f"kept ids not among the slots' ids: {sorted(set(held[missing].tolist()))[:10]}")
    out = np.empty(len(q))
    for rows, a in _attention_chunks(z, q, t, metric, log_w, None):
        outside = np.ones(a.shape, dtype=bool)
        r, c = np.nonzero(valid[rows])
        outside[r, rows_of[rows][r, c]] = False
        out[rows] = np.where(outside, a, 0.0).sum(axis=1)
    return out


def brute_force_topk(vectors: npt.ArrayLike, queries: npt.ArrayLike, k: int,
                     metric: str = "cosine") -> tuple[IntArray, FloatArray]:
    """Exact top-k by score, float64: (rows (n, min(k, N)) into ``vectors``, best first,
    ties broken by the lower row; their scores (n, min(k, N))). Scores as
    :func:`dense_attention` (for l2 the negative squared distance)."""
    z, q = _prepared(vectors, queries, metric)
    k = cast(int, _check_k(k))
    width = min(k, len(z))
    rows_out = np.empty((len(q), width), dtype=np.int64)
    scores_out = np.empty((len(q), width))
    for rows in _chunks(len(q), len(z)):
        s = _scores(z, q[rows], metric)
        top = np.argsort(-s, axis=1, kind="stable")[:, :width]
        rows_out[rows] = top
        scores_out[rows] = np.take_along_axis(s, top, axis=1)
    return rows_out, scores_out


def total_variation(p: npt.ArrayLike, q: npt.ArrayLike) -> FloatArray:
    """(n,) the total-variation distance 0.5 * sum |p - q| of each row (a 1-D pair is one row)."""
    a, b = np.atleast_2d(np.asarray(p, dtype=np.float64)), np.atleast_2d(np.asarray(q, dtype=np.float64))
    if a.shape != b.shape:
        raise InvalidValueError(f"distributions of shapes {a.shape} and {b.shape}")
    return cast(FloatArray, 0.5 * np.abs(a - b).sum(axis=1))


# -- the contract --------------------------------------------------------------------------
def _raises(exc: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
    import pytest  # a development dependency: only the contract's tests need it

    return pytest.raises(exc)


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)


class MemoryContract:
    """The tests every memory must pass through its public API, against this module's
    references (the zarr ``StoreTests`` pattern). Subclass it once per implementation,
    named ``Test...`` so pytest collects it, and give it:

    - :meth:`create` (required): a new empty memory at ``path`` (a directory that does not
      exist yet; an in-process memory ignores it) with ``dim`` = :attr:`dim`, metric
      :attr:`metric`, ``index="Flat"`` and ``temperature`` = :attr:`temperature`, so that
      every answer is exact and comparable to the references;
    - :meth:`reopen` (durable memories): close the memory and open the one stored at
      ``path`` again; set :attr:`durable` False instead for an in-process memory (its reopen
      tests are then skipped);
    - :meth:`on_teardown` to register what must be stopped after each test (servers, ...);
      memories created or reopened through the contract are closed by it.

    A test an implementation fails because it lacks a feature is overridden in the subclass
    with ``pytest.mark.xfail(strict=True, reason=...)`` calling ``super()``: the gap stays
    visible, and the mark fails as soon as the gap is closed.
    """

    dim: ClassVar[int] = 8
    metric: ClassVar[str] = "cosine"
    temperature: ClassVar[float] = 0.1
    durable: ClassVar[bool] = True
    slots: ClassVar[int] = 90  # slots each test writes (small: a contract runs on slow memories too)
    n_classes: ClassVar[int] = 5
    k: ClassVar[int] = 5  # the small k of the top-k checks
    atol: ClassVar[float] = 1e-5  # float32 scores: a relative error of ~1e-7 / T in the logits
    bound_slack: ClassVar[float] = 1e-6  # how far under the true omitted mass a certificate may round

    # -- what a subclass provides ------------------------------------------------------
    def create(self, path: Path) -> MemoryLike:
        """A new, empty memory (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement create(path)")

    def reopen(self, memory: MemoryLike, path: Path) -> MemoryLike:
        """Close ``memory`` and open the memory stored at ``path`` again."""
        raise NotImplementedError(f"{type(self).__name__} must implement reopen(memory, path) or set durable = False")

    def on_teardown(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` after the test (after its memories are closed; last registered first)."""
        self._cleanups.append(fn)

    # -- pytest's per-test set-up and tear-down -------------------------------------------
    def setup_method(self, method: object = None) -> None:
        self._open: list[MemoryLike] = []
        self._cleanups: list[Callable[[], object]] = []

    def teardown_method(self, method: object = None) -> None:
        failures: list[BaseException] = []
        for step in [m.close for m in reversed(self._open)] + list(reversed(self._cleanups)):
            try:
                step()
            except Exception as exc:  # every step runs; the first failure is raised after
                failures.append(exc)
        self._open, self._cleanups = [], []
        if failures:
            raise failures[0]

    # -- helpers -----------------------------------------------------------------------
    def new_memory(self, tmp_path: Path) -> MemoryLike:
        mem = self.create(tmp_path / "memory")
        self._open.append(mem)
        return mem

    def reopened(self, memory: MemoryLike, tmp_path: Path) -> MemoryLike:
        self._open = [m for m in self._open if m is not memory]
        mem = self.reopen(memory, tmp_path / "memory")
        self._open.append(mem)
        return mem

    def data(self, seed: int, n: int | None = None, *, str_labels: bool = False,
             spread: float = 1.0) -> tuple[npt.NDArray[np.float32], np.ndarray, FloatArray]:
        """(vectors (n, dim) float32, labels (n,) int64 or str, weights (n,) in [1/s, s])
        for s = ``spread`` (1: unit weights)."""
        rng = np.random.default_rng(seed)
        n = self.slots if n is None else n
        x = rng.standard_normal((n, self.dim)).astype(np.float32)
        y = rng.integers(0, self.n_classes, n)
        labels = np.array([f"class-{c}" for c in y]) if str_labels else y.astype(np.int64)
        w = np.exp(rng.uniform(-np.log(spread), np.log(spread), n)) if spread != 1 else np.ones(n)
        return x, labels, w

    def queries(self, x: npt.ArrayLike, seed: int, n: int = 6, *, gap: float = 1e-3) -> npt.NDArray[np.float32]:
        """n queries near slots of ``x`` whose k-th and (k+1)-th exact scores differ by at least
        ``gap`` (so float32 rounding cannot change which slots are the top-k)."""
        rng = np.random.default_rng(seed)
        v = np.asarray(x, dtype=np.float32)
        pool = v[rng.integers(0, len(v), 20 * n)] + 0.4 * rng.standard_normal((20 * n, v.shape[1])).astype(np.float32)
        _, s = brute_force_topk(v, pool, self.k + 1, self.metric)
        ok = pool[s[:, self.k - 1] - s[:, self.k] >= gap]
        assert len(ok) >= n, "too few well-separated queries: change the seed"
        return ok[:n]

    def check_answers(self, mem: MemoryLike, x: npt.ArrayLike, labels: npt.ArrayLike, weights: npt.ArrayLike,
                      ids: npt.ArrayLike, q: npt.ArrayLike) -> None:
        """With k >= the memory's size, both modes answer dense attention over exactly these
        slots (``ids[i]`` the id of ``x[i]``): classes, probs, each slot's attention, labels,
        and nothing left out."""
        vectors, slot_ids = np.asarray(x), np.asarray(ids, dtype=np.int64)
        assert len(mem) == len(vectors)
        p = dense_attention(vectors, labels, q, temperature=self.temperature, metric=self.metric, weights=weights)
        a = slot_attention(vectors, q, temperature=self.temperature, metric=self.metric, weights=weights)
        classes = np.unique(np.asarray(labels))
        for probs in ("top-k", "full"):
            res = mem.query(q, k=len(vectors) + 3, probs=probs)
            assert res.classes.tolist() == classes.tolist(), probs
            np.testing.assert_allclose(res.probs, p, atol=self.atol, err_msg=probs)
            assert [sorted(r) for r in res.ids.tolist()] == [sorted(slot_ids.tolist())] * len(p), probs
            col = _rows_of(slot_ids, res.ids)
            np.testing.assert_allclose(res.attention, np.take_along_axis(a, col, axis=1), atol=self.atol,
                                       err_msg=probs)
            assert res.labels.tolist() == classes[np.argmax(p, axis=1)].tolist(), probs
            assert (res.tail_bound == 0).all() and res.exact_bound, probs  # every slot scored
            if probs == "full":  # the estimated rest: nothing
                assert res.tail_estimate is not None
                np.testing.assert_allclose(res.tail_estimate, 0.0, atol=self.atol)
            else:
                assert res.tail_estimate is None

    def answers(self, mem: MemoryLike, q: npt.ArrayLike) -> list[QueryResult]:
        return [mem.query(q, k=self.k, probs="top-k"), mem.query(q, k=self.k, probs="full")]

    def assert_unchanged(self, mem: MemoryLike, before: tuple[int, list[int], list[QueryResult]],
                         q: npt.ArrayLike, *, rtol: float = 0.0, answers: bool = True) -> None:
        """The same slots and (``answers``) the same answers as ``before`` (:meth:`state`): equal,
        or within ``rtol`` (a reopened memory may sum its masses in another order)."""
        n, ids, results = before
        assert len(mem) == n and mem.ids().tolist() == ids
        for was, now in zip(results, self.answers(mem, q) if answers else []):
            assert was.classes.tolist() == now.classes.tolist()
            assert was.ids.tolist() == now.ids.tolist() and was.labels.tolist() == now.labels.tolist()
            for field in ("probs", "attention", "tail_bound", "tail_estimate"):
                a, b = getattr(was, field), getattr(now, field)
                assert (a is None) == (b is None), field
                if a is not None:
                    np.testing.assert_allclose(b, a, rtol=rtol, atol=0.0, err_msg=field)

    def state(self, mem: MemoryLike, q: npt.ArrayLike) -> tuple[int, list[int], list[QueryResult]]:
        return len(mem), mem.ids().tolist(), self.answers(mem, q)

    # -- writes ------------------------------------------------------------------------
    def test_int_labels_answer_dense_attention(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(1)
        ids = mem.add(x, y)
        assert ids.dtype == np.int64 and len(np.unique(ids)) == len(x) == len(mem)
        assert mem.ids().tolist() == sorted(ids.tolist())
        assert all(int(i) in mem for i in ids[:3]) and int(ids.max()) + 1 not in mem and "0" not in mem
        got = mem.get(ids[::-1])
        assert got.ids.tolist() == ids[::-1].tolist() and list(got.labels) == y[::-1].tolist()
        assert all(isinstance(v, (int, np.integer)) for v in got.labels)
        np.testing.assert_allclose(got.weights, 1.0)
        self.check_answers(mem, x, y, w, ids, self.queries(x, 2))

    def test_str_labels_answer_dense_attention(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(3, str_labels=True)
        ids = mem.add(x, list(y))
        assert len(np.unique(ids)) == len(x) == len(mem)
        got = mem.get(ids)
        assert list(got.labels) == y.tolist() and all(isinstance(v, str) for v in got.labels)
        assert mem.ids(labels=["class-1"]).tolist() == sorted(ids[y == "class-1"].tolist())
        self.check_answers(mem, x, y, w, ids, self.queries(x, 4))

    def test_given_ids_are_kept_and_name_their_slots(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(5)
        given = (10**15 + 7 * np.random.default_rng(5).permutation(len(x))).astype(np.int64)
        assert mem.add(x, y, ids=given).tolist() == given.tolist()
        assert mem.ids().tolist() == sorted(given.tolist())
        np.testing.assert_allclose(mem.get(given[:3]).vectors,
                                   x[:3] / np.linalg.norm(x[:3], axis=1, keepdims=True) if self.metric == "cosine"
                                   else x[:3], rtol=1e-6, atol=1e-6)
        self.check_answers(mem, x, y, w, given, self.queries(x, 6))  # each id's attention is its own slot's

    def test_upsert_replaces_slots_and_adds_new_ones(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(7)
        ids = mem.add(x, y)
        x2, y2, w2 = self.data(8, n=30, spread=4.0)
        fresh = np.arange(10) + int(ids.max()) + 1000
        targets = np.r_[ids[:20], fresh]  # 20 replaced, 10 new
        assert mem.add(x2, y2, ids=targets, weights=w2, upsert=True).tolist() == targets.tolist()
        assert len(mem) == len(x) + 10
        got = mem.get(targets)
        assert list(got.labels) == y2.tolist()
        np.testing.assert_allclose(got.weights, w2, rtol=1e-12)
        xs, ys, ws = np.r_[x2, x[20:]], np.r_[y2, y[20:]], np.r_[w2, w[20:]]
        self.check_answers(mem, xs, ys, ws, np.r_[targets, ids[20:]], self.queries(xs, 9))

    def test_weights_are_slot_masses(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(11, spread=20.0)
        ids = mem.add(x, y, weights=w)
        np.testing.assert_allclose(mem.get(ids).weights, w, rtol=1e-12)
        q = self.queries(x, 12)
        t, m = self.temperature, self.metric
        unweighted = dense_attention(x, y, q, temperature=t, metric=m)
        assert total_variation(unweighted, dense_attention(x, y, q, temperature=t, metric=m, weights=w)).max() > 0.05
        self.check_answers(mem, x, y, w, ids, q)

    def test_remove_by_ids(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(13, spread=3.0)
        ids = mem.add(x, y, weights=w)
        gone = np.zeros(len(x), dtype=bool)
        gone[::4] = True
        assert mem.remove(ids[gone]) == gone.sum()
        assert len(mem) == (~gone).sum() and mem.ids().tolist() == sorted(ids[~gone].tolist())
        assert not any(int(i) in mem for i in ids[gone][:3])
        q = self.queries(x[~gone], 14)
        for res in self.answers(mem, q):
            assert not np.isin(res.ids, ids[gone]).any()
        self.check_answers(mem, x[~gone], y[~gone], w[~gone], ids[~gone], q)

    def test_remove_by_labels(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(15, spread=3.0)
        ids = mem.add(x, y, weights=w)
        gone = np.isin(y, [1, 3])
        assert mem.ids(labels=[3, 1]).tolist() == sorted(ids[gone].tolist())
        assert mem.remove(labels=[1, 3]) == gone.sum() > 0
        assert len(mem.ids(labels=[1])) == 0 and len(mem) == (~gone).sum()
        self.check_answers(mem, x[~gone], y[~gone], w[~gone], ids[~gone], self.queries(x[~gone], 16))

    # -- queries: the two probability modes with a small k ----------------------------
    def test_top_k_probs_are_attention_over_the_exact_top_k(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(17, spread=3.0)
        ids = mem.add(x, y, weights=w)
        q, t, m = self.queries(x, 18), self.temperature, self.metric
        res = mem.query(q, k=self.k, probs="top-k")
        rows, scores = brute_force_topk(x, q, self.k, m)
        assert [sorted(r) for r in res.ids.tolist()] == [sorted(r) for r in ids[rows].tolist()]
        np.testing.assert_allclose(res.scores, scores, atol=self.atol)  # best first
        p = dense_attention(x, y, q, temperature=t, metric=m, weights=w, classes=res.classes, k=self.k)
        np.testing.assert_allclose(res.probs, p, atol=self.atol)
        a = slot_attention(x, q, temperature=t, metric=m, weights=w, k=self.k)
        np.testing.assert_allclose(res.attention, np.take_along_axis(a, _rows_of(ids, res.ids), axis=1),
                                   atol=self.atol)
        omitted = omitted_mass(x, q, res.ids, temperature=t, metric=m, weights=w, ids=ids)
        assert (omitted > 1e-3).any(), "a check of the bound needs mass left out"
        assert res.exact_bound and (res.tail_bound >= omitted - self.bound_slack).all(), (res.tail_bound, omitted)
        assert res.tail_estimate is None

    def test_full_probs_are_dense_attention_over_every_slot(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(19, spread=3.0)
        ids = mem.add(x, y, weights=w)
        q, t, m = self.queries(x, 20), self.temperature, self.metric
        res = mem.query(q, k=self.k, probs="full")
        rows, _ = brute_force_topk(x, q, self.k, m)
        assert [sorted(r) for r in res.ids.tolist()] == [sorted(r) for r in ids[rows].tolist()]
        p = dense_attention(x, y, q, temperature=t, metric=m, weights=w, classes=res.classes)
        assert total_variation(p, dense_attention(x, y, q, temperature=t, metric=m, weights=w, k=self.k)).max() > 1e-3
        np.testing.assert_allclose(res.probs, p, atol=self.atol)
        a = slot_attention(x, q, temperature=t, metric=m, weights=w)  # not renormalised over the top-k
        np.testing.assert_allclose(res.attention, np.take_along_axis(a, _rows_of(ids, res.ids), axis=1),
                                   atol=self.atol)
        assert res.tail_estimate is not None
        omitted = omitted_mass(x, q, res.ids, temperature=t, metric=m, weights=w, ids=ids)
        np.testing.assert_allclose(res.tail_estimate, omitted, atol=self.atol)
        assert res.exact_bound and (res.tail_bound == 0).all()  # a Flat index scores every slot: none unscored
        np.testing.assert_allclose(res.attention.sum(axis=1) + res.tail_estimate, 1.0, atol=1e-9)

    def test_a_lone_query_gets_its_row_of_a_batch(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(21, spread=3.0)
        mem.add(x, y, weights=w)
        q = self.queries(x, 22, n=3)
        for probs in ("top-k", "full"):
            batch = mem.query(q, k=self.k, probs=probs)
            for i in range(len(q)):
                one = mem.query(q[i], k=self.k, probs=probs)
                assert one.ids.tolist() == batch.ids[i:i + 1].tolist()
                assert one.classes.tolist() == batch.classes.tolist()
                np.testing.assert_allclose(one.probs, batch.probs[i:i + 1], atol=1e-9)
                np.testing.assert_allclose(one.tail_bound, batch.tail_bound[i:i + 1], atol=1e-9)

    def test_stats_count_slots_and_classes(self, tmp_path: Path) -> None:
        mem = self.new_memory(tmp_path)
        x, y, _ = self.data(23)
        ids = mem.add(x, y)
        mem.remove(ids[y == 2])
        s = mem.stats()
        assert (s.slots, s.classes, s.dim, s.metric) == (len(mem), self.n_classes - 1, self.dim, self.metric)
        assert s.exact

    def test_classes_are_the_labels_with_a_live_slot(self, tmp_path: Path) -> None:
        """``classes()``: the labels with a live slot."""
        mem = self.new_memory(tmp_path)
        x, y, _ = self.data(25)
        ids = mem.add(x, y)
        mem.remove(ids[y == 0])
        assert mem.classes().tolist() == list(range(1, self.n_classes))

    # -- bad input: refused, and nothing changes ---------------------------------------
    def _filled(self, tmp_path: Path, seed: int) -> tuple[MemoryLike, np.ndarray, IntArray, npt.NDArray[np.float32]]:
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(seed, spread=3.0)
        ids = mem.add(x, y, weights=w)
        return mem, x, ids, self.queries(x, seed + 1)

    def test_wrong_dimensions_are_refused_and_change_nothing(self, tmp_path: Path) -> None:
        from .errors import DimensionError

        mem, x, ids, q = self._filled(tmp_path, 27)
        before = self.state(mem, q)
        d = self.dim
        for bad in (np.ones((3, d + 1), np.float32), np.ones((3, d - 1), np.float32), np.ones(d + 1, np.float32)):
            with _raises(DimensionError):
                mem.add(bad, [0] * (len(bad) if bad.ndim == 2 else 1))
            self.assert_unchanged(mem, before, q, answers=False)
            with _raises(DimensionError):
                mem.query(bad, k=self.k)
            with _raises(DimensionError):
                mem.query(bad, k=self.k, probs="full")
        self.assert_unchanged(mem, before, q)

    def test_nan_and_inf_are_refused_and_change_nothing(self, tmp_path: Path) -> None:
        from .errors import EngineError

        mem, x, ids, q = self._filled(tmp_path, 29)
        before = self.state(mem, q)
        for value in (np.nan, np.inf):
            bad = x[:4].copy()
            bad[2, 1] = value
            with _raises(EngineError):
                mem.add(bad, [0, 1, 2, 3])
            self.assert_unchanged(mem, before, q, answers=False)
            with _raises(EngineError):
                mem.add(x[:4], [0, 1, 2, 3], weights=[1.0, value, 1.0, 1.0])
            self.assert_unchanged(mem, before, q, answers=False)
            for probs in ("top-k", "full"):
                with _raises(EngineError):
                    mem.query(bad, k=self.k, probs=probs)
        self.assert_unchanged(mem, before, q)

    def test_unknown_ids_are_refused_and_change_nothing(self, tmp_path: Path) -> None:
        from .errors import UnknownIdError

        mem, x, ids, q = self._filled(tmp_path, 31)
        before = self.state(mem, q)
        unknown = int(ids.max()) + 12345
        with _raises(UnknownIdError) as exc:
            mem.remove([int(ids[0]), unknown])
        assert exc.value.ids == [unknown]
        self.assert_unchanged(mem, before, q, answers=False)
        with _raises(UnknownIdError) as exc:
            mem.get([int(ids[1]), unknown])
        assert exc.value.ids == [unknown]
        self.assert_unchanged(mem, before, q)

    def test_other_bad_writes_are_refused_and_change_nothing(self, tmp_path: Path) -> None:
        from .errors import DuplicateIdError, InvalidValueError, UnknownLabelError

        mem, x, ids, q = self._filled(tmp_path, 33)
        before = self.state(mem, q)
        fresh = np.arange(3) + int(ids.max()) + 1
        cases: list[tuple[type[Exception], Callable[[], object]]] = [
            (InvalidValueError, lambda: mem.add(x[:3], ["a", "b", "c"])),  # a str label in an int memory
            (InvalidValueError, lambda: mem.add(x[:3], [0, 1])),  # fewer labels than vectors
            (InvalidValueError, lambda: mem.add(x[:3], [0, 1, 2], weights=[1.0, 0.0, 1.0])),
            (InvalidValueError, lambda: mem.add(x[:3], [0, 1, 2], weights=[1.0, -2.0, 1.0])),
            (DuplicateIdError, lambda: mem.add(x[:3], [0, 1, 2], ids=np.r_[fresh[:2], ids[5]])),
            (DuplicateIdError, lambda: mem.add(x[:3], [0, 1, 2], ids=[fresh[0], fresh[1], fresh[0]])),
            (UnknownLabelError, lambda: mem.remove(labels=[0, 99])),
            (InvalidValueError, lambda: mem.query(q, k=self.k, probs="every")),
        ]
        for kind, call in cases:
            with _raises(kind):
                call()
            self.assert_unchanged(mem, before, q, answers=False)
        self.assert_unchanged(mem, before, q)

    def test_an_empty_memory_refuses_queries(self, tmp_path: Path) -> None:
        from .errors import EmptyMemoryError

        mem = self.new_memory(tmp_path)
        x, y, _ = self.data(35)
        q = self.queries(x, 36)
        assert len(mem) == 0 and mem.ids().tolist() == []
        for probs in ("top-k", "full"):
            with _raises(EmptyMemoryError):
                mem.query(q, k=self.k, probs=probs)
        ids = mem.add(x, y)
        assert mem.remove(ids) == len(x)  # emptied again: the same
        assert len(mem) == 0
        for probs in ("top-k", "full"):
            with _raises(EmptyMemoryError):
                mem.query(q, k=self.k, probs=probs)
        assert len(mem) == 0 and mem.ids().tolist() == []

    # -- reopen ----------------------------------------------------------------------
    def _reopen_keeps_everything(self, tmp_path: Path, str_labels: bool) -> None:
        if not self.durable:
            _skip(f"{type(self).__name__} is not durable")
        mem = self.new_memory(tmp_path)
        x, y, w = self.data(37, str_labels=str_labels, spread=3.0)
        ids = mem.add(x[:60], y[:60], weights=w[:60])
        removed = ids[::5]
        mem.remove(removed)
        x2, y2, w2 = self.data(38, n=40, str_labels=str_labels, spread=3.0)
        live = ids[~np.isin(ids, removed)]
        up = np.r_[live[:10], int(ids.max()) + 1 + np.arange(30)]  # 10 replaced, 30 new
        mem.add(x2, y2, ids=up, weights=w2, upsert=True)
        q = self.queries(x, 39)
        before = self.state(mem, q)
        held = mem.ids()
        slots = mem.get(held)
        mem = self.reopened(mem, tmp_path)
        self.assert_unchanged(mem, before, q, rtol=1e-12)
        again = mem.get(held)
        assert list(again.labels) == list(slots.labels)
        np.testing.assert_array_equal(again.weights, slots.weights)
        np.testing.assert_array_equal(again.vectors, slots.vectors)
        keep = ~np.isin(ids, removed) & ~np.isin(ids, up)
        xs, ys, ws = np.r_[x[:60][keep], x2], np.r_[y[:60][keep], y2], np.r_[w[:60][keep], w2]
        self.check_answers(mem, xs, ys, ws, np.r_[ids[keep], up], q)
        new = mem.add(x[60:], y[60:])  # it still takes writes, with fresh ids
        assert not np.isin(new, held).any() and len(mem) == len(held) + len(new)

    def test_reopen_keeps_ids_slots_and_answers(self, tmp_path: Path) -> None:
        self._reopen_keeps_everything(tmp_path, str_labels=False)

    def test_reopen_keeps_str_labels(self, tmp_path: Path) -> None:
        self._reopen_keeps_everything(tmp_path, str_labels=True)


def _rows_of(ids: IntArray, found: npt.ArrayLike) -> IntArray:
    """The position in ``ids`` of each id of ``found`` (every one must be there; no padding)."""
    f = np.asarray(found, dtype=np.int64)
    sorter = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[sorter], f), len(ids) - 1)
    rows = sorter[pos]
    if not (ids[rows] == f).all():
        raise AssertionError(f"ids answered that were never written: {sorted(set(f[ids[rows] != f].tolist()))[:10]}")
    return rows
