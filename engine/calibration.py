"""Calibrated search breadth: the cheapest nprobe / efSearch that meets a recall target on the
memory's own data.

A fixed rule (probe enough lists to scan so many candidates) holds on the data it
was tuned on and can lose points elsewhere: on isotropic clusters with few slots per
class it missed a tenth of the true top-64. So whenever an IVF or HNSW index is
built, a sample of the indexed vectors is used as queries (each one's own slot left
out) and their top-k is compared with exact search (``faiss.knn``). The breadth
chosen is the smallest of a doubling ladder whose recall@k reaches the target
(default 0.98); where the index cannot reach it at all (lossy codes), the smallest
breadth within 0.005 of what its widest search reaches.

IVF-Flat needs no search per rung: it scores exactly, so a true neighbour is found
exactly when its list is probed, and one ranking of the lists per query gives the
recall of every nprobe at once. The exact top-k of the sample is then the whole cost
(about a tenth of the build at 200k slots, less above). Other indexes (codes, HNSW)
are searched rung by rung, climbed from the bottom so the cost stays about twice
that of the rung chosen.
This is what autofaiss does for its recall targets, done at build time in the engine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

RECALL_TARGET = 0.98
K = 64  # the default k of a query
QUERIES = 200  # sample size: each query averages 64 neighbours; the estimate is good to ~0.005
SHORTFALL = 0.005  # a lossy index: how far below its best recall the chosen breadth may be


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
    """

    nprobe: int | None
    ef_search: int | None
    recall: float
    k: int
    queries: int
    trained_on: int
    spec: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc) -> "Calibration | None":
        """A saved calibration, or None if ``doc`` is not a valid one (it is then measured again)."""
        def count(v, low):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        try:
            cal = cls(**doc)
        except TypeError:
            return None
        breadths = (cal.nprobe, cal.ef_search)
        valid = (sum(b is not None for b in breadths) == 1 and all(b is None or count(b, 1) for b in breadths)
                 and isinstance(cal.recall, float) and 0.0 <= cal.recall <= 1.0 and count(cal.k, 1)
                 and count(cal.queries, 1) and count(cal.trained_on, 2) and isinstance(cal.spec, str)
                 and isinstance(cal.seconds, float))
        return cal if valid else None

    def breadth(self, k: int, limit: int) -> int:
        """The breadth for a query of ``k``: calibrated at K, scaled up for a larger k."""
        value = self.nprobe if self.nprobe is not None else self.ef_search
        return int(min(limit, value * max(1.0, k / self.k)))


def calibrate(index: faiss.Index, vectors: np.ndarray, spec: str, *, ivf=None, hnsw=None,
              target: float = RECALL_TARGET, k: int = K, queries: int = QUERIES, seed: int = 0) -> Calibration:
    """Measure recall@k of ``index`` (holding ``vectors``) over a doubling ladder of breadths.

    Args:
        index: the FAISS index, built over ``vectors`` (row i = position i).
        vectors: (n, dim) float32.
        spec: its factory string (kept in the result).
        ivf: the IVF layer of ``index``, if it has one.
        hnsw: the HNSW layer of ``index``, if it has one.
        target: the recall@k to reach.
        k: neighbours per query.
        queries: how many of ``vectors`` to use as queries.
        seed: seed of the sample.
    """
    t0 = time.perf_counter()
    n = len(vectors)
    k = max(1, min(k, n - 1))
    rows = np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))
    q = np.ascontiguousarray(vectors[rows])
    _, exact = faiss.knn(q, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    truth = _without_self(exact, rows, k)
    if ivf is not None:
        ladder = [1 << i for i in range(int(np.log2(ivf.nlist)) + 1)]
        if ladder[-1] != ivf.nlist:
            ladder.append(int(ivf.nlist))
    else:
        ladder = [k * (1 << i) for i in range(8)]  # efSearch k .. 128k

    ranks = _list_ranks(ivf, q, vectors, truth) if ivf is not None and _exact_lists(index, ivf) else None

    def recall(breadth: int) -> float:
        if ranks is not None:  # a neighbour is found exactly when its list is probed
            return float(np.mean(ranks < breadth))
        if ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = breadth
        else:
            params = faiss.SearchParametersHNSW()
            params.efSearch = breadth
        _, got = index.search(q, k + 1, params=params)
        found = _without_self(got, rows, k)
        return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth)]))

    measured: dict[int, float] = {}
    for breadth in ladder:  # bottom up: the cost is about twice that of the rung chosen
        measured[breadth] = recall(breadth)
        if measured[breadth] >= target:
            break
    best = next((b for b in ladder if b in measured and measured[b] >= target), None)
    if best is None:  # never reached (lossy codes): the smallest rung close to the widest one
        top = measured[ladder[-1]]
        best = next(b for b in ladder if measured[b] >= top - SHORTFALL)
    return Calibration(nprobe=best if ivf is not None else None, ef_search=best if ivf is None else None,
                       recall=measured[best], k=k, queries=len(rows), trained_on=n, spec=spec,
                       seconds=time.perf_counter() - t0)


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


def _without_self(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's neighbours less the query's own row (or less the last one if it is absent)."""
    mine = ids == rows[:, None]
    mine[~mine.any(axis=1), -1] = True
    return ids[~mine].reshape(len(ids), -1)[:, :k]
