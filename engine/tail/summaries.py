"""Summaries: per-(cell, class) count, mass, vector sum, pivot and reach of a memory's
live slots, kept up to date by every write (see :mod:`engine.tail`)."""

from __future__ import annotations

import threading

import numpy as np

from ..slots import Growable
from .estimate import Estimator, GroupView
from .vmf import kappa_from_resultant

CELL_SHIFT = 32  # group key = cell << 32 | label index


def partition_size(n: int) -> int:
    """Cells of a partition made for ``n`` slots (an index without lists): about 2 sqrt(n),
    each trained on 64 points or more; 1 below 4,096 slots."""
    from ..index import auto_nlist

    return 1 if n < 4096 else min(auto_nlist(n), n // 64)


def _kmeans(dim: int, metric: str, n_cells: int, vectors, live: np.ndarray, seed: int):
    """assign(vectors) -> cells of a k-means partition trained on a sample of the live rows."""
    import faiss

    rng = np.random.default_rng(seed)
    sample = np.ascontiguousarray(vectors(np.sort(rng.choice(live, min(len(live), 256 * n_cells), replace=False))),
                                  dtype=np.float32)
    km = faiss.Kmeans(dim, n_cells, niter=10, seed=seed, spherical=metric == "cosine")
    km.train(sample)
    quantizer = km.index

    def assign(v: np.ndarray) -> np.ndarray:
        return quantizer.search(np.ascontiguousarray(v, dtype=np.float32), 1)[1][:, 0].astype(np.int32)

    return assign


class Summaries(Estimator):
    """Per-(cell, class) count, mass and vector sum of a memory's live slots.

    Args:
        dim: vector dimension.
        metric: "cosine" or "ip".
        n_cells: cells of the partition (1: a group per class).
    """

    def __init__(self, dim: int, metric: str, n_cells: int = 1):
        self.dim, self.metric, self.n_cells = dim, metric, n_cells
        self.assign = None  # vectors -> their cells (with more than one cell)
        self.trained_on, self.own_partition = 0, False
        self._cell = Growable(np.int32) if n_cells > 1 else None  # each table row's cell
        self.keys = np.empty(0, np.int64)  # sorted group keys
        self.count = np.empty(0, np.int64)
        self.mass = np.empty(0, np.float64)
        self.sums = np.empty((0, dim), np.float64)
        self.pivot = np.empty((0, dim), np.float32)  # a fixed point of each group (unit for cosine) ...
        # ... and its reach: the smallest cosine of a slot to it (cosine), or the largest distance (ip)
        self.radius = np.empty(0, np.float64)
        self._derived = None  # what queries read, computed once after each change
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        held = self.keys.nbytes + self.count.nbytes + self.mass.nbytes + self.sums.nbytes + self.pivot.nbytes \
            + self.radius.nbytes
        derived = self._derived  # what queries read: the directions and pivots as float32 matrices
        if derived is not None:
            held += derived.unit_t.nbytes + derived.pivot_t.nbytes
        return int(held + (self._cell.nbytes if self._cell is not None else 0))

    def cells_of(self, rows: np.ndarray) -> np.ndarray:
        return self._cell.view[rows] if self._cell is not None else np.zeros(np.shape(rows), np.int32)

    @classmethod
    def of(cls, dim: int, metric: str, n_rows: int, live: np.ndarray, label_idx: np.ndarray, weights: np.ndarray,
           vectors, *, index_cells=None, chunk: int = 65536, seed: int = 0) -> "Summaries":
        """Summaries of a whole table.

        Args:
            n_rows: rows of the table (live or not).
            live: the live rows.
            label_idx, weights: of every row.
            vectors: ``vectors(rows)`` reads vectors back (in chunks: a large memory is never
                copied whole).
            index_cells: ``(cell of every row, cells, assign(vectors))`` of an index that has
                cells (IVF lists); None: the slots are partitioned here by k-means
                (:func:`partition_size` cells, trained on a sample of the live vectors).
        """
        if index_cells is not None:
            row_cells, n_cells, assign = index_cells
        else:
            row_cells, n_cells, assign = None, partition_size(len(live)), None
            if n_cells > 1:
                assign = _kmeans(dim, metric, n_cells, vectors, live, seed)
        out = cls(dim, metric, n_cells)
        out.assign, out.trained_on, out.own_partition = assign, len(live), index_cells is None
        if out._cell is not None:
            out._cell.extend(row_cells if row_cells is not None else np.zeros(n_rows, np.int32))
        for lo in range(0, len(live), chunk):
            rows = live[lo:lo + chunk]
            v = vectors(rows)
            cells = None
            if out._cell is not None:
                if row_cells is None:
                    out._cell.view[rows] = assign(v)
                cells = out._cell.view[rows]
            out._change(cells, label_idx[rows], weights[rows], v, +1)
        return out

    def stale(self, n_alive: int) -> bool:
        """Whether a partition made here should be made again: the memory grew 4x since."""
        return self.own_partition and partition_size(n_alive) > self.n_cells and n_alive >= 4 * self.trained_on

    # -- changes --------------------------------------------------------------------------
    def append(self, label_idx: np.ndarray, weights: np.ndarray, vectors: np.ndarray) -> None:
        """Count appended rows (in table order) into their groups."""
        cells = None
        if self._cell is not None:
            cells = self.assign(vectors)
            self._cell.extend(cells)
        self._change(cells, label_idx, weights, vectors, +1)

    def remove(self, rows: np.ndarray, label_idx: np.ndarray, weights: np.ndarray, vectors: np.ndarray) -> None:
        """Take tombstoned rows out of their groups."""
        self._change(self.cells_of(rows) if self._cell is not None else None, label_idx, weights, vectors, -1)

    def _change(self, cells, label_idx, weights, vectors, sign: int) -> None:
        if len(label_idx) == 0:
            return
        key = np.asarray(label_idx, np.int64)
        if cells is not None:
            key = key | (np.asarray(cells, np.int64) << CELL_SHIFT)
        order = np.argsort(key, kind="stable")
        key = key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        uniq = key[starts]
        w = np.asarray(weights, np.float64)[order]
        count = np.diff(np.r_[starts, len(key)])
        mass = np.add.reduceat(w, starts)
        sums = np.add.reduceat(np.asarray(vectors, np.float64)[order] * w[:, None], starts, axis=0)
        pos = np.searchsorted(self.keys, uniq)
        new = (pos >= len(self.keys)) | (self.keys[np.minimum(pos, len(self.keys) - 1)] != uniq) \
            if len(self.keys) else np.ones(len(uniq), bool)
        if new.any():  # insert empty groups, keeping keys sorted; a new group's pivot is the
            at = pos[new]  # mean of its first slots (fixed from then on)
            first = sums[new] / mass[new][:, None]
            if self.metric == "cosine":  # a unit pivot: the reach is an angle (its cosine)
                first /= np.maximum(np.linalg.norm(first, axis=1, keepdims=True), 1e-300)
            self.keys = np.insert(self.keys, at, uniq[new])
            self.count = np.insert(self.count, at, 0)
            self.mass = np.insert(self.mass, at, 0.0)
            self.sums = np.insert(self.sums, at, 0.0, axis=0)
            self.pivot = np.insert(self.pivot, at, first.astype(np.float32), axis=0)
            self.radius = np.insert(self.radius, at, 1.0 if self.metric == "cosine" else 0.0)
            pos = np.searchsorted(self.keys, uniq)
        self.count[pos] += sign * count
        self.mass[pos] += sign * mass
        self.sums[pos] += sign * sums
        if sign > 0:  # every slot a group ever held lies within its reach of the pivot
            v = np.asarray(vectors, np.float64)[order]
            pivots = self.pivot[np.repeat(pos, count)].astype(np.float64)
            if self.metric == "cosine":  # the smallest cosine to the pivot
                near = np.einsum("nd,nd->n", v, pivots)
                self.radius[pos] = np.minimum(self.radius[pos], np.minimum.reduceat(near, starts))
            else:  # the largest distance from it
                dist = np.linalg.norm(v - pivots, axis=1)
                self.radius[pos] = np.maximum(self.radius[pos], np.maximum.reduceat(dist, starts))
        empty = pos[self.count[pos] <= 0]  # exactly nothing left: no rounding residue
        self.count[empty], self.mass[empty], self.sums[empty] = 0, 0.0, 0.0
        self._derived = None

    # -- reads ----------------------------------------------------------------------------
    def _groups(self) -> "GroupView":
        """What queries read of the live groups, computed once after each change."""
        derived = self._derived
        if derived is None:
            with self._lock:  # readers share the state: one builds, the others wait for it
                derived = self._derived
                if derived is None:
                    derived = self._derived = self._view()  # published whole, once built
        return derived

    def _view(self) -> "GroupView":
        """The live groups in class order, with every derived term the estimate and the
        certificate read (built aside, then published whole by :meth:`_groups`)."""
        live = self.mass > 0
        keys = self.keys[live]
        labels = keys & ((1 << CELL_SHIFT) - 1)
        order = np.argsort(labels, kind="stable")  # class-major: a class's groups are a run
        mass, sums, labels = self.mass[live][order], self.sums[live][order], labels[order]
        pivot, radius = self.pivot[live][order], self.radius[live][order]
        cells = (keys >> CELL_SHIFT)[order]
        norm = np.linalg.norm(sums, axis=1)
        kappa = resultant = None
        if self.metric == "cosine":
            resultant = np.minimum(norm / mass, 1.0)
            kappa = kappa_from_resultant(resultant, self.dim)
            unit, scale = sums / np.maximum(norm, 1e-300)[:, None], resultant
        else:
            unit, scale = sums / mass[:, None], np.ones(len(mass))
        at = np.empty(len(order), np.int64)
        at[order] = np.arange(len(order))  # key order -> position in class order
        derived = GroupView(keys, at, labels, mass, np.ascontiguousarray(unit.T, np.float32),
                            scale, resultant, kappa, self.dim)
        derived.pivot_t = np.ascontiguousarray(pivot.T)
        derived.radius32 = radius.astype(np.float32)
        # float32 products (q . pivot) and radii rounded: a margin well above their error
        if self.metric == "cosine":
            derived.slack = np.float32(1e-5)
        else:
            derived.slack = np.float32(1e-5 * (1.0 + np.linalg.norm(pivot, axis=1).max() + radius.max())
                                       if len(radius) else 0)
        derived.cells = cells
        # masses are running float64 sums: a relative margin far above their rounding
        derived.mass_bound = mass * (1 + 1e-9)
        derived.log_mass_bound = np.log(derived.mass_bound)
        derived.log_mass_bound32 = derived.log_mass_bound.astype(np.float32)
        derived.sin_r32 = np.sqrt(np.maximum(1 - radius * radius, 0)).astype(np.float32)
        by_cell = np.argsort(cells, kind="stable")  # each cell's groups, for probed-list caps
        derived.cell_order = by_cell
        derived.cell_count = np.bincount(cells, minlength=self.n_cells)
        derived.cell_start = np.cumsum(derived.cell_count) - derived.cell_count
        return derived
