"""Typed results returned by :class:`engine.Memory`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import IndexOutOfRangeError, InvalidValueError


@dataclass(frozen=True)
class SparseProbs:
    """Class probabilities that carry mass on few of many classes: per query, the classes
    scored or estimated by name (CSR: ``indptr``, ``columns``, ``values``), plus a rest
    ``rest`` shared by every class in proportion to ``prior``. ``dense()`` is the (n, C)
    matrix; ``argmax()`` the most probable column without building it."""

    indptr: np.ndarray
    columns: np.ndarray
    values: np.ndarray
    rest: np.ndarray
    prior: np.ndarray

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def dense(self) -> np.ndarray:
        out = self.rest[:, None] * self.prior[None, :]
        rows = np.repeat(np.arange(len(self)), np.diff(self.indptr))
        np.add.at(out, (rows, self.columns), self.values)
        return out

    def rows(self, lo: int, hi: int) -> SparseProbs:
        a, b = self.indptr[lo], self.indptr[hi]
        return SparseProbs(self.indptr[lo:hi + 1] - a, self.columns[a:b], self.values[a:b], self.rest[lo:hi],
                           self.prior)

    def argmax(self) -> np.ndarray:
        n = len(self)
        counts = np.diff(self.indptr)
        rows = np.repeat(np.arange(n), counts)
        full = self.values + self.rest[rows] * self.prior[self.columns]
        best = np.full(n, -1, np.int64)
        best_value = np.full(n, -np.inf)
        named = np.flatnonzero(counts > 0)
        if len(named):
            best_value[named] = np.maximum.reduceat(full, self.indptr[:-1][named])
            at = np.flatnonzero(full == best_value[rows])  # the lowest column reaching its row's largest
            lowest = np.full(n, np.iinfo(np.int64).max)
            np.minimum.at(lowest, rows[at], self.columns[at])
            best[named] = lowest[named]
        # a class named in no row can still win through the rest alone: those rows get the dense answer
        doubt = self.rest * (self.prior.max() if len(self.prior) else 0.0) >= best_value
        for i in np.flatnonzero(doubt):
            best[i] = int(np.argmax(self.rows(int(i), int(i) + 1).dense()[0]))
        return best


@dataclass(frozen=True)
class QueryResult:
    """The answer to a batch of queries.

    Attributes:
        classes: (C,) the label of each column of ``probs`` (the memory's live classes).
        labels: (n,) the most probable label of each query.
        ids: (n, k) ids of the retrieved slots, best first; -1 where fewer were used.
        scores: (n, k) similarity of each retrieved slot (NaN on padding).
        attention: (n, k) attention weight of each retrieved slot (0 on padding).
        tail_bound: (n,) upper bound on the attention mass, and so on the
            total-variation error of ``probs``, left out by top-k.
        exact_bound: True when ``tail_bound`` is a certificate: an exact index (Flat), or a
            full answer (``probs="full"``) whose scores are exact (every slot of the IVF-Flat
            lists it probed, every slot HNSW returned); False when it is an estimate (a top-k
            answer of IVF or HNSW, which may miss closer slots; scores from compressed codes).
        k: the largest number of slots any query used.
        k_requested: the ``k`` asked for; ``k < k_requested`` means it was clamped
            to the memory's size (or the index found fewer).
        slot_classes: (n, k) column of ``classes`` of each retrieved slot, -1 on padding.
        missing_shards: shards of a :class:`~engine.cluster.ShardedMemory` that did not
            answer a query made with ``allow_partial`` (``tail_bound`` covers their mass).
        tail_estimate: (n,) the estimated fraction of attention on the slots left out, when
            the memory estimates it (``Memory(probs="full")``): ``attention`` then sums to
            ``1 - tail_estimate`` and ``probs`` include the estimated rest per class.
            None for top-k probabilities.

    ``probs``, the (n, C) class probabilities, is built from ``attention`` and
    ``slot_classes`` when first read: with many classes it is large, and most
    callers only want ``labels``.
    """

    classes: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    attention: np.ndarray
    tail_bound: np.ndarray
    exact_bound: bool
    k: int
    k_requested: int
    slot_classes: np.ndarray | None = None
    missing_shards: tuple = ()
    tail_estimate: np.ndarray | None = None
    _probs: np.ndarray | SparseProbs | None = field(default=None, repr=False, compare=False)

    @property
    def probs(self) -> np.ndarray:
        """(n, C) class probabilities p(c) (columns: ``classes``): from top-k attention, plus the
        estimated rest when the memory estimates it (``tail_estimate``)."""
        probs = self._probs
        if isinstance(probs, SparseProbs):
            probs = probs.dense()
            object.__setattr__(self, "_probs", probs)
        if probs is None:
            from .attention import class_probs

            if self.slot_classes is None:
                raise InvalidValueError("a result without slot classes carries its probs")
            probs = class_probs(self.attention, self.slot_classes, len(self.classes))
            object.__setattr__(self, "_probs", probs)
        return probs

    @classmethod
    def build(cls, *, classes: np.ndarray, labels: np.ndarray, ids: np.ndarray, scores: np.ndarray,
              attention: np.ndarray, tail_bound: np.ndarray, exact_bound: bool, k: int, k_requested: int,
              slot_classes: np.ndarray | None = None, missing_shards: tuple = (),
              tail_estimate: np.ndarray | None = None, probs: np.ndarray | SparseProbs | None = None
              ) -> QueryResult:
        """The one way a result is made (the query path, the shards' merge, the client): the
        fields above, and ``probs`` when already known (dense, e.g. received from a server, or
        :class:`SparseProbs`, made dense when first read); else they are built from
        ``attention`` and ``slot_classes`` when first read."""
        if probs is None and slot_classes is None:
            raise InvalidValueError("a result needs its slots' classes or its probabilities")
        return cls(classes=classes, labels=labels, ids=ids, scores=scores, attention=attention,
                   tail_bound=tail_bound, exact_bound=exact_bound, k=k, k_requested=k_requested,
                   slot_classes=slot_classes, missing_shards=missing_shards, tail_estimate=tail_estimate,
                   _probs=probs)

    def __getitem__(self, i: int | slice) -> QueryResult:
        """One query's answer (``res[i]``: a result of one row), or some queries' (``res[a:b]``)."""
        n = len(self.labels)
        if isinstance(i, slice):
            lo, hi, step = i.indices(n)
            if step != 1:
                raise InvalidValueError("a result is sliced in order, with step 1")
            return self.rows(lo, max(lo, hi))
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise InvalidValueError(f"a result is indexed by query number, not {type(i).__name__}")
        if not -n <= i < n:
            raise IndexOutOfRangeError(f"query {i} of a result of {n}")
        return self.rows(int(i) % n, int(i) % n + 1)

    def rows(self, lo: int, hi: int) -> QueryResult:
        """The answers to queries lo..hi-1 alone (same classes, so ``probs`` columns match)."""
        ids = self.ids[lo:hi]
        used = int((ids >= 0).sum(axis=1).max()) if len(ids) else 0
        width = max(used, 1)
        sliced: dict[str, Any] = dict(
            classes=self.classes, labels=self.labels[lo:hi], ids=ids[:, :width], scores=self.scores[lo:hi, :width],
            attention=self.attention[lo:hi, :width], tail_bound=self.tail_bound[lo:hi], exact_bound=self.exact_bound,
            k=used, k_requested=self.k_requested,
            slot_classes=None if self.slot_classes is None else self.slot_classes[lo:hi, :width],
            missing_shards=self.missing_shards,
            tail_estimate=None if self.tail_estimate is None else self.tail_estimate[lo:hi])
        probs = self._probs
        if probs is not None:
            probs = probs.rows(lo, hi) if isinstance(probs, SparseProbs) else probs[lo:hi]
        return QueryResult.build(**sliced, probs=probs)

    @property
    def k_clamped(self) -> bool:
        """Whether fewer slots than requested were used."""
        return self.k < self.k_requested

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ClassMass:
    """A memory's full answer as masses a merge can add up: per query, in absolute log units
    (``log sum w exp(s / T)``), the whole mass, the part scored exactly and the bound on the
    part not scored, and how the whole splits among the memory's classes
    (``Retrieved.classes``).

    Attributes:
        probs: (n, C) each class's share of the whole mass, columns as ``Retrieved.classes``.
        attention: (n, k) each retrieved slot's share of the whole mass (0 on padding).
        log_z, log_scored, log_bound: (n,) as above (``log_bound`` -inf: every slot scored).
        certified: whether ``log_bound`` is a certificate.
    """

    probs: np.ndarray
    attention: np.ndarray
    log_z: np.ndarray
    log_scored: np.ndarray
    log_bound: np.ndarray
    certified: bool


@dataclass(frozen=True)
class Retrieved:
    """Each query's top-k slots without attention (:meth:`engine.Memory.retrieve`): what a
    merge of several memories' answers needs to compute exact attention over the union.

    Attributes:
        ids: (n, k) ids of the retrieved slots, best first; -1 where fewer were found.
        scores: (n, k) float32 similarities (-inf on padding).
        weights: (n, k) slot masses (1 on padding).
        labels: (n, k) labels (int64, or object for str labels; arbitrary on padding).
        omitted_weight: (n,) total mass of the live slots not retrieved (an upper bound).
        total_weight: mass of every live slot (an upper bound, rounding included).
        exact: the index is exact, so every slot left out scores at most the last one retrieved.
        full: with ``probs="full"``, every class's mass in the memory's full answer.
        classes: the memory's live labels, sorted (the columns its own ``probs`` would have).
    """

    ids: np.ndarray
    scores: np.ndarray
    weights: np.ndarray
    labels: np.ndarray
    omitted_weight: np.ndarray
    total_weight: float
    exact: bool
    full: ClassMass | None = None
    classes: np.ndarray | None = None

    def omitted_log_mass(self, temperature: float) -> np.ndarray:
        """(n,) log of a bound on ``sum w exp(s / T)`` over the slots left out: the mass left
        out times exp(s_k / T), s_k the lowest score retrieved (-inf when nothing is left out).
        A certificate for an exact index, an estimate otherwise."""
        valid = self.ids >= 0
        low = np.where(valid, self.scores.astype(np.float64), np.inf).min(axis=1) / temperature
        with np.errstate(divide="ignore"):
            out = np.log(self.omitted_weight) + low
        return np.where(self.omitted_weight > 0, out, -np.inf)


@dataclass(frozen=True)
class Slots:
    """Slots read back by :meth:`engine.Memory.get` (vectors as stored: L2-normalised for cosine)."""

    ids: np.ndarray
    labels: list
    weights: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class MemoryStats:
    """Size and shape of a memory. Byte counts are what the process holds for it."""

    slots: int
    classes: int
    dim: int
    metric: str
    index: str
    exact: bool
    tombstones: int
    bytes_vectors: int
    bytes_index: int
    bytes_ids: int
    nlist: int | None = None  # IVF lists of the active index
    lossy: bool = False  # the active index stores approximate vectors (PQ, SQ, projections)
    nprobe: int | None = None  # IVF lists a query of k=64 probes (set, calibrated or by the size rule)
    ef_search: int | None = None  # HNSW breadth a query of k=64 uses
    recall: float | None = None  # recall@64 measured when the breadth was calibrated (None if not)
    trained_on: int = 0  # vectors the active index was last trained on (0: needs no training)
    bytes_tail: int = 0  # the tail summaries (engine.tail), once a probs="full" query built them

    @property
    def bytes_total(self) -> int:
        return self.bytes_vectors + self.bytes_index + self.bytes_ids + self.bytes_tail

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "bytes_total": self.bytes_total}


@dataclass(frozen=True)
class CompactionReport:
    """What :meth:`engine.Memory.compact` did.

    Attributes:
        slots: slots after compaction.
        dropped: removed slots (tombstones) cleared away.
        merged_away: live slots fewer than before (merged or evicted).
        policy: the policy used, or None when there was no budget (only tombstones were dropped).
        budget: the budget in slots, or None.
        seconds: wall time it took.
        kept: which state the policy kept and why (distill: the distilled state of the step
            best on held-out queries, or the merge it started from when none beat it, with
            the figures); None for the other policies.
    """

    slots: int
    dropped: int
    merged_away: int
    policy: str | None
    budget: int | None
    seconds: float
    kept: str | None = None

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)
