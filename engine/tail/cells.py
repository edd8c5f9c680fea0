"""Cells: a partition of a memory's live slots, with what the estimate and the certificate
of the unscored rest read of each cell (see :mod:`engine.tail`), kept up to date by writes.

A cell is an IVF list when the index has lists, else a cell of a spherical k-means
partition made here (:func:`partition_size` cells). Each cell keeps its slot count, its
mass ``W``, the mass-weighted vector sum ``S``, a fixed pivot (the unit centroid for
cosine, the centroid for inner product) and its reach (the smallest cosine of any slot
it ever held to the pivot; for inner product the largest distance). Each class keeps its
mass and vector sum too: how the estimated rest is shared among classes. Running masses
carry a bound on their rounding error; when a removal
leaves a bound above a millionth of a cell's mass (a huge slot removed next to small
ones), the state drops the cells and the next full answer builds them afresh.
"""

from __future__ import annotations

import threading

import numpy as np

from ..slots import Growable
from .vmf import kappa_from_resultant

EPS = float(np.finfo(np.float64).eps)


def partition_size(n: int) -> int:
    """Cells of a partition made for ``n`` slots (an index without lists): about 2 sqrt(n),
    each trained on 64 points or more; 1 below 4,096 slots."""
    from ..index import auto_nlist

    return 1 if n < 4096 else min(auto_nlist(n), n // 64)


def kmeans_partition(dim: int, metric: str, n_cells: int, vectors, live: np.ndarray, seed: int = 0):
    """(assign(vectors) -> cells, the (n_cells, dim) centroids) of a k-means partition trained
    on a sample of the live rows (``vectors(rows)`` reads them)."""
    import faiss

    rng = np.random.default_rng(seed)
    sample = np.ascontiguousarray(vectors(np.sort(rng.choice(live, min(len(live), 256 * n_cells), replace=False))),
                                  dtype=np.float32)
    lifted = metric == "l2"  # lifted slots (x, |x|^2): cells are made on x (see engine.metric)
    width = dim - 1 if lifted else dim
    km = faiss.Kmeans(width, n_cells, niter=10, seed=seed, spherical=metric == "cosine")
    km.train(np.ascontiguousarray(sample[:, :width]))
    quantizer = km.index

    def assign(v: np.ndarray) -> np.ndarray:
        return quantizer.search(np.ascontiguousarray(v[:, :width], dtype=np.float32), 1)[1][:, 0].astype(np.int32)

    centroids = np.asarray(km.centroids, np.float32).reshape(n_cells, width)
    if lifted:
        centroids = np.hstack([centroids, np.einsum("nd,nd->n", centroids, centroids)[:, None]])
    return assign, centroids


class Cells:
    """Per-cell count, mass, vector sum, pivot and reach, and per-(cell, class) mass.

    Args:
        dim: vector dimension.
        metric: "cosine", "ip" or "l2" (lifted vectors, see :mod:`engine.metric`: summed and
            bounded as inner product; the estimate reads each cell's spread from the sums).
        centroids: (n_cells, dim) the partition's centroids (pivots are made from them).
        assign: vectors -> their cells.
        own: whether the partition was made here (then made again when the memory grows 4x).
    """

    def __init__(self, dim: int, metric: str, centroids: np.ndarray, assign, *, own: bool, trained_on: int = 0):
        self.dim, self.metric, self.n_cells = dim, metric, len(centroids)
        self.assign, self.own_partition, self.trained_on = assign, own, trained_on
        pivot = np.asarray(centroids, np.float64)
        if metric == "cosine":  # a unit pivot: the reach is an angle (its cosine)
            norm = np.linalg.norm(pivot, axis=1, keepdims=True)
            pivot = np.where(norm > 0, pivot / np.maximum(norm, 1e-300), 0.0)
            pivot[norm[:, 0] == 0, 0] = 1.0
        self.pivot = pivot.astype(np.float32)
        n = self.n_cells
        self._row_cell = Growable(np.int32)
        self.count = np.zeros(n, np.int64)
        self.mass = np.zeros(n, np.float64)
        self.sums = np.zeros((n, dim), np.float64)
        self.reach = np.full(n, 1.0 if metric == "cosine" else 0.0)
        self.error = np.zeros(n, np.float64)  # a bound on each running mass's rounding error
        self.label_mass = np.zeros(0, np.float64)  # each class's mass and vector sum ...
        self.label_sums = np.zeros((0, dim), np.float64)
        self.label_count = np.zeros(0, np.int64)  # ... slot count and mass rounding bound
        self.label_error = np.zeros(0, np.float64)
        self._view: CellView | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, dim: int, metric: str, n_rows: int, live: np.ndarray, label_idx: np.ndarray, weights: np.ndarray,
           vectors, *, index_cells=None, chunk: int = 65536, seed: int = 0) -> Cells:
        """Cells of a whole table.

        Args:
            n_rows: rows of the table (live or not).
            live: the live rows.
            label_idx, weights: of every row.
            vectors: ``vectors(rows)`` reads vectors back (in chunks: a large memory is never copied).
            index_cells: ``(cell of every row, centroids, assign(vectors))`` of an index that has
                lists; None: the slots are partitioned here by k-means.
        """
        if index_cells is not None:
            row_cells, centroids, assign = index_cells
        else:
            row_cells, n_cells = None, partition_size(len(live))
            if n_cells > 1:
                assign, centroids = kmeans_partition(dim, metric, n_cells, vectors, live, seed)
            else:  # one cell, its pivot the mean of the slots
                total = np.zeros(dim)
                for lo in range(0, len(live), chunk):
                    total += np.asarray(vectors(live[lo:lo + chunk]), np.float64).sum(axis=0)
                centroids = (total / max(len(live), 1))[None, :].astype(np.float32)
                assign = lambda v: np.zeros(len(v), np.int32)  # noqa: E731
        out = cls(dim, metric, centroids, assign, own=index_cells is None, trained_on=len(live))
        out._row_cell.extend(row_cells if row_cells is not None else np.zeros(n_rows, np.int32))
        for lo in range(0, len(live), chunk):
            rows = live[lo:lo + chunk]
            v = vectors(rows)
            if row_cells is None and out.n_cells > 1:
                out._row_cell.view[rows] = assign(v)
            out._change(out._row_cell.view[rows], label_idx[rows], weights[rows], v, +1)
        return out

    @property
    def nbytes(self) -> int:
        held = sum(a.nbytes for a in (self.count, self.mass, self.sums, self.reach, self.error,
                                      self.pivot, self.label_mass, self.label_sums,
                                      self.label_count, self.label_error))
        held += self._row_cell.nbytes
        view = self._view
        return int(held + (view.nbytes if view is not None else 0))

    def cells_of(self, rows: np.ndarray) -> np.ndarray:
        return self._row_cell.view[rows]

    @property
    def row_cells(self) -> np.ndarray:
        """The cell of every table row (dead rows included)."""
        return self._row_cell.view

    def stale(self, n_alive: int) -> bool:
        """Whether a partition made here should be made again: the memory grew 4x since."""
        return self.own_partition and partition_size(n_alive) > self.n_cells and n_alive >= 4 * self.trained_on

    # -- changes --------------------------------------------------------------------------
    def append(self, label_idx: np.ndarray, weights: np.ndarray, vectors: np.ndarray,
               lists: np.ndarray | None = None) -> None:
        """Count appended rows (in table order) into their cells; ``lists``: the rows' IVF lists
        found beforehand (outside the readers' lock), used when the cells are the index's lists."""
        if self.n_cells == 1:
            cells = np.zeros(len(vectors), np.int32)
        elif lists is not None and not self.own_partition:
            cells = np.asarray(lists, np.int32)
        else:
            cells = self.assign(vectors)
        self._row_cell.extend(cells)
        self._change(cells, label_idx, weights, vectors, +1)

    def remove(self, rows: np.ndarray, label_idx: np.ndarray, weights: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Take tombstoned rows out of their cells; returns the cells whose running sums lost
        their precision (a huge mass removed next to small ones): the caller sums afresh."""
        cells = self.cells_of(rows)
        self._change(cells, label_idx, weights, vectors, -1)
        touched = np.unique(cells)
        labels = np.unique(label_idx)
        if ((self.label_error[labels] > 1e-6 * self.label_mass[labels]) & (self.label_count[labels] > 0)).any():
            return touched  # a class's running mass lost its precision: every cell is summed afresh
        return touched[(self.error[touched] > 1e-6 * self.mass[touched]) | (self.mass[touched] < 0)]

    def _change(self, cells, label_idx, weights, vectors, sign: int) -> None:
        if len(label_idx) == 0:
            return
        cells = np.asarray(cells, np.int64)
        w = np.asarray(weights, np.float64)
        n = self.n_cells
        self.count += sign * np.bincount(cells, minlength=n)
        delta = np.bincount(cells, weights=w, minlength=n)
        before = self.mass.copy()
        self.mass += sign * delta
        ops = np.bincount(cells, minlength=n)
        self.error += (ops + 2) * EPS * (np.abs(before) + delta)
        v = np.asarray(vectors, np.float64)
        np.add.at(self.sums, cells, sign * v * w[:, None])
        empty = self.count <= 0  # exactly nothing left: no rounding residue
        if empty.any():
            self.mass[empty], self.sums[empty], self.error[empty], self.count[empty] = 0.0, 0.0, 0.0, 0
        if sign > 0:  # every slot a cell ever held lies within its reach of the pivot
            p = self.pivot[cells].astype(np.float64)
            if self.metric == "cosine":
                np.minimum.at(self.reach, cells, np.einsum("nd,nd->n", v, p))
            else:
                np.maximum.at(self.reach, cells, np.linalg.norm(v - p, axis=1))
        labels = np.asarray(label_idx, np.int64)
        top = int(labels.max()) + 1
        if top > len(self.label_mass):
            grow = top - len(self.label_mass)
            self.label_mass = np.concatenate([self.label_mass, np.zeros(grow)])
            self.label_sums = np.concatenate([self.label_sums, np.zeros((grow, self.dim))])
            self.label_count = np.concatenate([self.label_count, np.zeros(grow, np.int64)])
            self.label_error = np.concatenate([self.label_error, np.zeros(grow)])
        m = len(self.label_mass)
        delta = np.bincount(labels, weights=w, minlength=m)
        self.label_error += (np.bincount(labels, minlength=m) + 2) * EPS * (np.abs(self.label_mass) + delta)
        self.label_mass += sign * delta
        self.label_count += sign * np.bincount(labels, minlength=m)
        np.add.at(self.label_sums, labels, sign * v * w[:, None])
        gone = self.label_count <= 0
        self.label_mass[gone], self.label_sums[gone], self.label_error[gone] = 0.0, 0.0, 0.0
        self._view = None

    # -- reads ----------------------------------------------------------------------------
    def view(self) -> CellView:
        """What queries read, computed once after each change (one reader builds it, the
        others wait for it rather than see it half built)."""
        view = self._view
        if view is None:
            with self._lock:
                view = self._view
                if view is None:
                    view = self._view = CellView(self)
        return view


class CellView:
    """The cells as a query reads them: float32 matrices and per-cell terms of the estimate
    (vMF mean directions and concentrations) and of the certificate (pivots, reaches, mass
    bounds), and the same vMF terms per class."""

    def __init__(self, cells: Cells):
        mass, sums = cells.mass, cells.sums
        self.n_cells, self.dim, self.metric = cells.n_cells, cells.dim, cells.metric
        self.live = mass > 0
        safe = np.where(self.live, mass, 1.0)
        self.log_mass = np.where(self.live, np.log(safe), -np.inf)
        norm = np.linalg.norm(sums, axis=1)
        if cells.metric == "cosine":
            self.resultant = np.minimum(norm / safe, 1.0)
            self.kappa = kappa_from_resultant(self.resultant, cells.dim)
            unit = sums / np.maximum(norm, 1e-300)[:, None]
        else:
            self.resultant = self.kappa = None
            unit = sums / safe[:, None]
        self.unit_t = np.ascontiguousarray(unit.T, np.float32)
        self.pivot_t = np.ascontiguousarray(cells.pivot.T)
        self.reach32 = cells.reach.astype(np.float32)
        self.sin_reach32 = np.sqrt(np.maximum(1 - cells.reach ** 2, 0)).astype(np.float32)
        # masses are running float64 sums: their rounding bound, and a margin far above it
        bound = np.where(self.live, (mass + cells.error) * (1 + 1e-9), 0.0)
        with np.errstate(divide="ignore"):
            self.log_mass_bound = np.log(bound)
        if cells.metric == "cosine":  # float32 products (q . pivot) and reaches rounded: a margin
            self.slack = np.float32(1e-5)
        else:
            scale = 1.0 + np.linalg.norm(cells.pivot, axis=1).max() + cells.reach.max() if self.n_cells else 1.0
            self.slack = np.float32(1e-5 * scale)
        self.label_mass = np.maximum(cells.label_mass, 0.0)
        lsafe = np.where(self.label_mass > 0, self.label_mass, 1.0)
        with np.errstate(divide="ignore"):
            self.label_log_mass = np.where(self.label_mass > 0, np.log(lsafe), -np.inf).astype(np.float32)
        lnorm = np.linalg.norm(cells.label_sums, axis=1)
        if cells.metric == "cosine":
            self.label_resultant = np.minimum(lnorm / lsafe, 1.0)
            self.label_kappa = kappa_from_resultant(self.label_resultant, cells.dim)
            lunit = cells.label_sums / np.maximum(lnorm, 1e-300)[:, None]
        else:
            self.label_resultant = self.label_kappa = None
            lunit = cells.label_sums / lsafe[:, None]
        self.label_means = np.ascontiguousarray(lunit, np.float64)  # what the (query, class) kernel reads
        # l2: a cell's lifted mean is (mean x, mean |x|^2), so its spread (the mean squared
        # distance of its slots to their mean) is the last column less the mean's squared norm
        self.spread = self.label_spread = None
        if cells.metric == "l2":
            self.spread = _spread(unit).astype(np.float32)
            self.label_spread = _spread(lunit)
        self.label_kappa_or_empty = np.empty(0) if self.label_kappa is None else self.label_kappa
        self.label_log_mass64 = self.label_log_mass.astype(np.float64)
        self.nbytes = int(self.unit_t.nbytes + self.pivot_t.nbytes + self.label_means.nbytes)


def _spread(means: np.ndarray) -> np.ndarray:
    """Each lifted mean's spread: mean |x|^2 less |mean x|^2 (at least 0)."""
    return np.maximum(means[:, -1] - np.einsum("nd,nd->n", means[:, :-1], means[:, :-1]), 0.0)
