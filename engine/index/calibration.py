"""Calibrated search breadth: the cheapest nprobe / efSearch whose answer stays close to
exact search on the memory's own data.

A fixed rule (probe enough lists to scan so many candidates) holds on the data it was
tuned on and can lose points elsewhere. So whenever an IVF or HNSW index is built, a
sample of the indexed vectors is used as queries (each one's own slot and its exact
copies left out) and what a breadth answers is compared with what exact search
(``faiss.knn``) answers. The breadth chosen is the smallest of a doubling ladder that
meets the target, climbed from the bottom so the cost stays about twice that of the
rung chosen; where no rung meets it (lossy codes), the smallest rung within a small
margin of what the widest one reaches.

Two targets:

- **the answer** (the default): at the memory's temperature, the top-k attention's
  class answer agrees with exact search's on at least ``AGREEMENT`` of the queries
  and its class probabilities are within ``ANSWER_TV`` total variation of exact
  search's on average. Attention sits mostly on the first few neighbours, so the
  64th neighbour may be missed at no cost to the answer: on hard isotropic data
  (2,000 classes, 100 slots each) recall@64 0.98 needs half the lists, the answer
  an eighth. A sharper temperature needs fewer lists: the same searches give the
  breadth of a ladder of sharper temperatures (down to a seventeenth), so a memory whose
  temperature is chosen after its index is built (``temperature="auto"``) uses its own
  breadth without searching again; a softer one than measured is measured again.
- **recall** (``Memory(recall=r)``): recall@k of the exact top-k reaches ``r``. For
  IVF-Flat no search per rung is needed: it scores exactly, so a true neighbour is
  found exactly when its list is probed, and one ranking of the lists per query
  gives the recall of every nprobe at once.

This is what autofaiss does for its recall targets, done at build time in the engine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from ..errors import InvalidValueError

RECALL_TARGET = 0.98  # of the recall target
AGREEMENT = 0.995  # of the answer target: the share of queries whose top class is exact search's
ANSWER_TV = 0.1  # and the mean total variation of their class probabilities to exact search's
SHARPER = 1.5 ** -np.arange(8)  # the answer is also measured at these multiples of the temperature
TEMPERATURE_DRIFT = 1.1  # and measured again once the temperature is softer than this times it
K = 64  # the default k of a query
QUERIES = 200  # recall sample: each query averages 64 neighbours; the estimate is good to ~0.005
ANSWER_QUERIES = 1000  # answer sample: one agreement per query, good to ~0.002 at 0.995
SHORTFALL = 0.005  # a lossy index: how far below its best the chosen breadth may be
# the breadth is checked on the new slots once this share of the vectors it was measured on is written
DRIFT_WRITTEN = 0.5
DRIFT_MARGIN = 0.01  # and measured again when they fall this far short of the target
DRIFT_QUERIES = 500  # new slots asked (answer target; recall asks QUERIES): 0.01 is 3 standard errors at 0.995


@dataclass(frozen=True)
class Answer:
    """What the answer target needs besides the vectors: each position's label code and
    log weight, and the temperature queries attend at."""

    labels: np.ndarray
    log_weights: np.ndarray
    temperature: float


@dataclass(frozen=True)
class Calibration:
    """What calibration chose and measured.

    Attributes:
        nprobe: IVF lists probed (None for HNSW).
        ef_search: HNSW search breadth (None for IVF).
        recall: measured recall@k of that breadth, leave-one-out, against exact search.
        k: the k it was measured at.
        queries: sample size.
        trained_on: vectors in the index when measured (a rebuild over other vectors re-measures).
        spec: the FAISS factory string of the index measured.
        seconds: what it took.
        target: "answer" or "recall", what the breadth was chosen for.
        temperature: the temperature the answer was measured at (None for recall).
        agreement: the share of sampled queries whose top class matched exact search's
            (None for recall).
        tv: their mean total variation to exact search's class probabilities (None for recall).
        sharper: (temperature, breadth) pairs, the breadth the answer target needs at each of
            a ladder of temperatures sharper than ``temperature`` (empty for recall).
    """

    nprobe: int | None
    ef_search: int | None
    recall: float
    k: int
    queries: int
    trained_on: int
    spec: str
    seconds: float
    target: str = "recall"  # what a saved calibration without the field was chosen for
    temperature: float | None = None
    agreement: float | None = None
    tv: float | None = None
    sharper: tuple = ()

    def as_dict(self) -> dict:
        doc = asdict(self)
        doc["sharper"] = [list(p) for p in self.sharper]
        return doc

    @classmethod
    def from_dict(cls, doc) -> Calibration | None:
        """A saved calibration, or None if ``doc`` is not a valid one (it is then measured again)."""
        def count(v, low):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        try:
            cal = cls(**{**doc, "sharper": tuple(tuple(p) for p in doc.get("sharper", ()))})
        except TypeError:
            return None
        breadths = (cal.nprobe, cal.ef_search)
        valid = (sum(b is not None for b in breadths) == 1 and all(b is None or count(b, 1) for b in breadths)
                 and isinstance(cal.recall, float) and 0.0 <= cal.recall <= 1.0 and count(cal.k, 1)
                 and count(cal.queries, 1) and count(cal.trained_on, 2) and isinstance(cal.spec, str)
                 and isinstance(cal.seconds, float) and cal.target in ("answer", "recall"))
        if valid and cal.target == "answer":
            valid = all(isinstance(v, float) and np.isfinite(v) for v in (cal.temperature, cal.agreement, cal.tv)) \
                and cal.temperature > 0 and 0 <= cal.agreement <= 1 and 0 <= cal.tv <= 1 \
                and all(len(p) == 2 and isinstance(p[0], float) and p[0] > 0 and count(p[1], 1) for p in cal.sharper) \
                and [p[0] for p in cal.sharper] == sorted((p[0] for p in cal.sharper), reverse=True)
        elif valid:
            valid = cal.sharper == () and cal.temperature is None
        return cal if valid else None

    def fits(self, recall: float | None, temperature: float) -> bool:
        """Whether this calibration was measured for the target asked now: recall (``recall``
        a number), or the answer at a temperature at most ``TEMPERATURE_DRIFT`` times
        softer than the one measured."""
        if recall is not None:
            return self.target == "recall"
        return self.target == "answer" and self.temperature is not None \
            and temperature <= TEMPERATURE_DRIFT * self.temperature

    def breadth(self, k: int, limit: int, temperature: float | None = None) -> int:
        """The breadth for a query of ``k`` at ``temperature``: calibrated at K (and, for the
        answer, at the sharpest measured temperature that is still at least as soft as
        ``temperature``), scaled up for a larger k."""
        value = self.nprobe if self.nprobe is not None else self.ef_search
        if temperature is not None:
            for t, b in self.sharper:  # softest first
                if t >= temperature * (1 - 1e-9):
                    value = b
        return int(min(limit, value * max(1.0, k / self.k)))


@dataclass(frozen=True)
class DriftCheck:
    """A check of the calibrated breadth on the slots written since it was measured (or last
    checked): the data may have moved away from what the breadth was measured on.

    Attributes:
        slots: vectors in the index when checked.
        written: rows written since the breadth was measured or last checked; the queries
            were drawn from those still live.
        queries: how many of them were asked.
        breadth: the nprobe / efSearch checked (the one queries use).
        recall: their recall@k of the exact top-k at that breadth.
        agreement: the share whose top class agrees with exact search's (answer target).
        tv: their mean total variation to exact search's class probabilities (answer target).
        drifted: whether they fell short of the target by more than ``DRIFT_MARGIN`` (the
            breadth is then measured again on the whole memory).
        seconds: what the check took.
    """

    slots: int
    written: int
    queries: int
    breadth: int
    recall: float
    agreement: float | None
    tv: float | None
    drifted: bool
    seconds: float


def check_drift(index: faiss.Index, vectors: np.ndarray, cal: Calibration, rows: np.ndarray, breadth: int, *,
                written: int, ivf=None, hnsw=None, target: float | None = None, answer: Answer | None = None,
                l2: bool = False) -> DriftCheck:
    """Measure ``breadth`` on ``rows`` of ``vectors`` as :func:`calibrate` measures a rung (each
    query's own slot and its copies left out, against exact search), for ``cal``'s target:
    the answer (``target`` None) or recall ``target``."""
    got = calibrate(index, vectors, cal.spec, ivf=ivf, hnsw=hnsw, target=target, answer=answer, k=cal.k,
                    rows=rows, breadths=[breadth], l2=l2)
    if target is None:
        drifted = got.agreement < AGREEMENT - DRIFT_MARGIN or got.tv > ANSWER_TV + DRIFT_MARGIN
    else:
        drifted = got.recall < target - DRIFT_MARGIN
    return DriftCheck(slots=len(vectors), written=written, queries=got.queries, breadth=breadth, recall=got.recall,
                      agreement=got.agreement, tv=got.tv, drifted=bool(drifted), seconds=got.seconds)


def calibrate(index: faiss.Index, vectors: np.ndarray, spec: str, *, ivf=None, hnsw=None,
              target: float | None = RECALL_TARGET, answer: Answer | None = None, k: int = K,
              queries: int | None = None, seed: int = 0, rows: np.ndarray | None = None,
              breadths: list[int] | None = None, l2: bool = False) -> Calibration:
    """Measure ``index`` (holding ``vectors``) over a doubling ladder of breadths.

    Args:
        index: the FAISS index, built over ``vectors`` (row i = position i).
        vectors: (n, dim) float32.
        spec: its factory string (kept in the result).
        ivf: the IVF layer of ``index``, if it has one.
        hnsw: the HNSW layer of ``index``, if it has one.
        target: the recall@k to reach; None: the answer target (``answer`` is then needed).
        answer: labels, weights and temperature of the answer target.
        k: neighbours per query.
        queries: how many of ``vectors`` to use as queries (default: QUERIES for recall,
            ANSWER_QUERIES for the answer).
        seed: seed of the sample.
        rows: the positions to use as queries instead of a sample.
        breadths: the rungs to measure instead of the doubling ladder.
        l2: ``index`` is an L2 index (scores are then negated squared distances, whose
            softmax is the l2 memory's attention; a copy is the same vector).
    """
    t0 = time.perf_counter()
    if target is None and answer is None:
        raise InvalidValueError("the answer target needs labels, weights and a temperature")
    n = len(vectors)
    k = max(1, min(k, n - 1))
    queries = queries or (QUERIES if target is not None else ANSWER_QUERIES)
    if rows is None:
        rows = np.random.default_rng(seed).choice(n, min(queries, n), replace=False)
    rows = np.sort(np.asarray(rows, np.int64))
    q = np.ascontiguousarray(vectors[rows])
    kind = faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT

    if l2:  # an exact copy is the same vector
        def own(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
            return (ids == rows[:, None]) | ((ids >= 0) & (vectors[np.maximum(ids, 0)] == q[:, None, :]).all(axis=2))
    else:  # an exact copy scores what the query's own slot does: its squared norm
        norms = np.einsum("nd,nd->n", q, q)

        def own(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
            return (ids == rows[:, None]) | \
                (np.abs(scores - norms[:, None]) <= 1e-6 * np.maximum(1.0, np.abs(norms))[:, None])

    def scored(found: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A search's (scores, ids), higher better: for l2, -|q - x|^2 (its softmax is the l2
        memory's attention)."""
        return (-found[0], found[1]) if l2 else found
    d_exact, exact = scored(faiss.knn(q, vectors, k + 1, metric=kind))
    truth = _without_self(exact, rows, k)
    if ivf is not None:
        ladder = [1 << i for i in range(int(np.log2(ivf.nlist)) + 1)]
        if ladder[-1] != ivf.nlist:
            ladder.append(int(ivf.nlist))
    else:
        ladder = [k * (1 << i) for i in range(8)]  # efSearch k .. 128k
    if breadths is not None:
        ladder = sorted(breadths)

    def searched(breadth: int) -> tuple[np.ndarray, np.ndarray]:
        if ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = breadth
        else:
            params = faiss.SearchParametersHNSW()
            params.efSearch = breadth
        return scored(index.search(q, k + 1, params=params))

    if target is None:
        temps = float(answer.temperature) * SHARPER
        exact_answer = _neighbours(d_exact, exact, rows, own, k, answer)
        measured: dict[int, list[tuple[float, float]]] = {}  # breadth -> (agreement, tv) per temperature
        found: dict[int, np.ndarray] = {}
        for breadth in ladder:  # bottom up: the cost is about twice that of the rung chosen
            d, found[breadth] = searched(breadth)
            pair = _Comparison(exact_answer, _neighbours(d, found[breadth], rows, own, k, answer))
            measured[breadth] = [pair.at(t) for t in temps]
            if _meets(measured[breadth][0]):
                break
        first = next((b for b in ladder if b in measured and _meets(measured[b][0])), None)
        if first is None:  # never met (lossy codes): the smallest rung close to the widest one
            top = measured[ladder[-1]][0]
            first = next(b for b in ladder if measured[b][0][0] >= top[0] - SHORTFALL
                         and measured[b][0][1] <= top[1] + SHORTFALL)
        # a sharper temperature takes the first rung that met the target for it, never more
        chosen = [first] + [min(first, next((b for b in ladder if b in measured and _meets(measured[b][j])),
                                            first)) for j in range(1, len(temps))]
        agree, tv = measured[chosen[0]][0]
        return Calibration(nprobe=chosen[0] if ivf is not None else None,
                           ef_search=chosen[0] if ivf is None else None,
                           recall=_recall(_without_self(found[chosen[0]], rows, k), truth), k=k,
                           queries=len(rows), trained_on=n, spec=spec,
                           seconds=time.perf_counter() - t0, target="answer",
                           temperature=float(answer.temperature), agreement=agree, tv=tv,
                           sharper=tuple((float(t), int(b)) for t, b in zip(temps, chosen)))

    # recall of what a fresh query would find: the query's exact copies are left out with it
    # (data written many times over would otherwise find its copies at any breadth)
    wide = min(n, 2 * k)
    d_wide, i_wide = scored(faiss.knn(q, vectors, wide, metric=kind))
    truth = _without_copies(d_wide, i_wide, rows, own, k)
    ranks = _list_ranks(ivf, q, vectors, truth) if ivf is not None and _exact_lists(index, ivf) else None

    def recall(breadth: int) -> float:
        if ranks is not None:  # a neighbour is found exactly when its list is probed
            return float(np.mean(ranks[truth >= 0] < breadth)) if (truth >= 0).any() else 1.0
        if ivf is not None:  # as many results as the truth was drawn from: nprobe alone sets the breadth
            params = faiss.SearchParametersIVF()
            params.nprobe = breadth
            d, got = scored(index.search(q, wide, params=params))
        else:  # HNSW returns at most efSearch results: the ladder starts at as many as the truth's
            params = faiss.SearchParametersHNSW()
            params.efSearch = breadth
            d, got = scored(index.search(q, wide, params=params))
        return _recall(_without_copies(d, got, rows, own, k), truth)

    if ivf is None:
        ladder = [b for b in ladder if b >= wide] or [wide]

    reached: dict[int, float] = {}
    for breadth in ladder:  # bottom up: the cost is about twice that of the rung chosen
        reached[breadth] = recall(breadth)
        if reached[breadth] >= target:
            break
    best = next((b for b in ladder if b in reached and reached[b] >= target), None)
    if best is None:  # never reached (lossy codes): the smallest rung close to the widest one
        top_recall = reached[ladder[-1]]
        best = next(b for b in ladder if reached[b] >= top_recall - SHORTFALL)
    return Calibration(nprobe=best if ivf is not None else None, ef_search=best if ivf is None else None,
                       recall=reached[best], k=k, queries=len(rows), trained_on=n, spec=spec,
                       seconds=time.perf_counter() - t0)


def _recall(found: np.ndarray, truth: np.ndarray, chunk: int = 256) -> float:
    """The share of ``truth``'s ids (-1: none) found in the same row of ``found`` (ids unique per row)."""
    hits = 0
    for lo in range(0, len(truth), chunk):
        f, t = found[lo:lo + chunk], truth[lo:lo + chunk]
        hits += int(((f[:, :, None] == t[:, None, :]) & (f[:, :, None] >= 0)).any(axis=1).sum())
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0


def _meets(measure: tuple[float, float]) -> bool:
    return measure[0] >= AGREEMENT and measure[1] <= ANSWER_TV


def _neighbours(scores: np.ndarray, ids: np.ndarray, rows: np.ndarray, own, k: int,
                answer: Answer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, scores, log weights), each (m, k), of each query's top-k less its own slot
    and exact copies of it (``own(scores, ids)`` marks them); a label of -1 and a score of
    -inf mark no slot."""
    twin = own(scores, ids)
    keep = (ids >= 0) & ~twin
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    keep = np.take_along_axis(keep, order, 1)
    ids = np.where(keep, np.take_along_axis(ids, order, 1), 0)
    scores = np.where(keep, np.take_along_axis(scores, order, 1).astype(np.float64), -np.inf)
    return np.where(keep, answer.labels[ids], -1), scores, np.where(keep, answer.log_weights[ids], 0.0)


def _attention(scores: np.ndarray, log_w: np.ndarray, temperature: float) -> np.ndarray:
    """(m, k) softmax attention of each row at ``temperature`` (0 where no slot)."""
    logits = scores / temperature + log_w
    best = logits.max(axis=1, keepdims=True)
    att = np.exp(logits - np.where(np.isfinite(best), best, 0.0))
    return att / np.maximum(att.sum(axis=1, keepdims=True), 1e-300)


class _Comparison:
    """Two answers over the same queries (exact search's and a breadth's) grouped by class
    once, compared at any temperature."""

    def __init__(self, exact: tuple, got: tuple):
        self.exact, self.got = exact, got
        labels = np.concatenate([exact[0], got[0]], axis=1)
        m, w = labels.shape
        self.order = np.argsort(labels, axis=1, kind="stable")
        lab = np.take_along_axis(labels, self.order, 1)
        start = np.concatenate([np.ones((m, 1), bool), lab[:, 1:] != lab[:, :-1]], axis=1)
        within = np.cumsum(start, axis=1) - 1
        self.group = (within + (np.arange(m) * w)[:, None]).ravel()
        self.real = np.zeros((m, w), bool)  # groups that are a class, not "no slot"
        np.put_along_axis(self.real, within, lab >= 0, axis=1)
        self.shape = (m, w)

    def at(self, temperature: float) -> tuple[float, float]:
        """(share of queries whose top class agrees, mean total variation of class probabilities)."""
        m, w = self.shape
        a = np.take_along_axis(np.concatenate([_attention(*self.exact[1:], temperature),
                                               np.zeros_like(self.got[1])], axis=1), self.order, 1)
        b = np.take_along_axis(np.concatenate([np.zeros_like(self.exact[1]),
                                               _attention(*self.got[1:], temperature)], axis=1), self.order, 1)
        pa = np.bincount(self.group, a.ravel(), m * w).reshape(m, w)
        pb = np.bincount(self.group, b.ravel(), m * w).reshape(m, w)
        tv = 0.5 * np.where(self.real, np.abs(pa - pb), 0.0).sum(axis=1)
        agree = np.where(self.real, pa, -1).argmax(axis=1) == np.where(self.real, pb, -1).argmax(axis=1)
        return float(agree.mean()), float(tv.mean())


def _exact_lists(index, ivf) -> bool:
    """Whether ``index`` is itself an IVF-Flat (no transform before it, exact scores) with an
    exact coarse quantizer: then a slot is found exactly when its list is probed. Otherwise
    (codes, projections, an approximate quantizer) only searching says what a breadth finds."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat) \
        and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat)


def _list_ranks(ivf, q: np.ndarray, vectors: np.ndarray, truth: np.ndarray, chunk: int = 32) -> np.ndarray:
    """(m, k) the position of each true neighbour's list in its query's probe order.

    IVF-Flat scores exactly, so a query probing ``p`` lists finds a true top-k neighbour
    exactly when that neighbour's list is among the ``p`` the coarse quantizer ranks first
    (the query's own slot is in its first list). Recall at every breadth then comes from
    one ranking of the lists per query instead of one search per breadth.
    """
    nlist, m = int(ivf.nlist), len(q)
    _, home = ivf.quantizer.search(np.ascontiguousarray(vectors[truth.ravel()]), 1)  # the list each was put in
    home = home[:, 0].reshape(truth.shape)
    ranks = np.empty(truth.shape, np.int64)
    for lo in range(0, m, chunk):  # (chunk, nlist) at a time: nlist may be large
        _, order = ivf.quantizer.search(q[lo:lo + chunk], nlist)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(nlist)[None, :], axis=1)
        ranks[lo:lo + chunk] = np.take_along_axis(rank, home[lo:lo + chunk], axis=1)
    return ranks


def _without_copies(scores: np.ndarray, ids: np.ndarray, rows: np.ndarray, own, k: int) -> np.ndarray:
    """(m, k) each row's first ``k`` neighbours that are neither the query's own row nor an
    exact copy of it (``own(scores, ids)`` marks them); -1 where fewer remain."""
    twin = own(scores, ids)
    keep = (ids >= 0) & ~twin
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(ids, order, 1), -1)
    if out.shape[1] < k:
        out = np.concatenate([out, np.full((len(out), k - out.shape[1]), -1, out.dtype)], axis=1)
    return out


def _without_self(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's neighbours less the query's own row (or less the last one if it is absent)."""
    mine = ids == rows[:, None]
    mine[~mine.any(axis=1), -1] = True
    return ids[~mine].reshape(len(ids), -1)[:, :k]
