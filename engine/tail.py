"""The attention mass top-k leaves out, estimated from per-partition summaries.

Matching Networks attend over the whole support set; the engine reads only the top-k
slots exactly. With many slots and a moderate temperature most of the mass lies outside
the top-k (at 1M slots and T = 0.05 typically over 80%), so top-k probabilities are not
those of the model that was trained. This module estimates, per class, the mass of the
slots left out, at a cost that depends on the number of groups, not of slots.

Slots are split into groups, one per (cell, class): a cell is an IVF list when the index
has them, else the whole memory (a group is then a class). A group keeps its slot count,
its mass ``W = sum w_i`` and the mass-weighted sum of its vectors ``S = sum w_i z_i``,
kept up to date on every write and rebuilt with the state.

The estimate of a group's attention mass ``sum w_i exp(q.z_i / T)``:

- cosine memories: the slots are modelled as a von Mises-Fisher distribution on the unit
  sphere with mean direction ``S / |S|`` and a concentration ``kappa`` fitted to the mean
  resultant length ``R = |S| / W`` (Banerjee et al. 2005, "Clustering on the unit
  hypersphere using von Mises-Fisher distributions", eq. 4.4). The mass is then ``W``
  times the distribution's moment generating function at ``q / T``,
  ``C_d(kappa) / C_d(|kappa mu + q / T|)``, computed in log space through the uniform
  (Debye) expansion of the Bessel function ``I_{d/2-1}``;
- inner-product memories: the first-order ``W exp(q.mu / T)``, ``mu = S / W``.

Both are exact when a group's slots are identical (``R = 1``). For a query, the slots
it retrieved are taken out of their groups first (their mass from ``W``, their scores
from ``q.S``), and each group's estimate is capped at ``W' exp(s_k / T)``: with an exact
index no slot left out scores above the k-th.
"""

from __future__ import annotations

import threading

import numpy as np

from .slots import _Growable

CELL_SHIFT = 32  # group key = cell << 32 | label index


def log_vmf_mgf(kappa: np.ndarray, c: np.ndarray, dim: int, inv_t: float) -> np.ndarray:
    """log E[exp(q.z / T)] for z ~ vMF(mu, kappa) on the unit sphere in ``dim`` dimensions,
    ``|q| = 1`` and ``c = q.mu``: ``log C_d(kappa) - log C_d(r)``, ``r = |kappa mu + q / T|``.

    With ``nu = d/2 - 1`` and the leading term of the Debye expansion of the Bessel function,
    ``I_nu(x) ~ exp(sqrt(nu^2 + x^2)) (x / (nu + sqrt(nu^2 + x^2)))^nu / sqrt(2 pi) (nu^2 + x^2)^(1/4)``,
    the difference of the two log normalisers is written through ``A - B`` (``A``, ``B`` the
    square roots at ``r`` and ``kappa``), which stays exact as ``kappa`` grows without bound
    (the limit is ``c / T``, a point mass). The terms dropped change the result by well
    under 1% for ``nu >= 10`` (d >= 22), a few % at d = 8.
    """
    nu = max(dim / 2 - 1, 0.5)
    r2_k2 = (2 * inv_t) * kappa * c + inv_t * inv_t  # r^2 - kappa^2
    b = np.sqrt(nu * nu + kappa * kappa)
    a_b = r2_k2 / (np.sqrt(np.maximum(b * b + r2_k2, 0.0)) + b)
    return a_b - nu * np.log1p(a_b / (nu + b)) - 0.5 * np.log1p(a_b / b)


def kappa_from_resultant(r: np.ndarray, dim: int) -> np.ndarray:
    """Concentration of a vMF whose mean resultant length is ``r`` (Banerjee et al. 2005)."""
    r = np.minimum(r, 1 - 1e-12)
    return r * (dim - r * r) / (1 - r * r)


class Summaries:
    """Per-(cell, class) count, mass and vector sum of a memory's live slots.

    Args:
        dim: vector dimension.
        metric: "cosine" or "ip".
        n_cells: cells of the partition (1: a group per class).
    """

    def __init__(self, dim: int, metric: str, n_cells: int = 1):
        self.dim, self.metric, self.n_cells = dim, metric, n_cells
        self._cell = _Growable(np.int32) if n_cells > 1 else None  # each table row's cell
        self.keys = np.empty(0, np.int64)  # sorted group keys
        self.count = np.empty(0, np.int64)
        self.mass = np.empty(0, np.float64)
        self.sums = np.empty((0, dim), np.float64)
        self._derived = None  # what queries read, computed once after each change
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        held = self.keys.nbytes + self.count.nbytes + self.mass.nbytes + self.sums.nbytes
        return int(held + (self._cell.nbytes if self._cell is not None else 0))

    def cells_of(self, rows: np.ndarray) -> np.ndarray:
        return self._cell.view[rows] if self._cell is not None else np.zeros(np.shape(rows), np.int32)

    @classmethod
    def of(cls, dim: int, metric: str, n_cells: int, row_cells: np.ndarray | None, live: np.ndarray,
           label_idx: np.ndarray, weights: np.ndarray, vectors, chunk: int = 65536) -> "Summaries":
        """Summaries of a whole table: ``row_cells`` the cell of every row (None: one cell),
        ``live`` the live rows, ``label_idx`` and ``weights`` of every row, and ``vectors(rows)``
        reading vectors back (in chunks, so a large memory is never copied whole)."""
        out = cls(dim, metric, n_cells if row_cells is not None else 1)
        if out._cell is not None:
            out._cell.extend(row_cells)
        for lo in range(0, len(live), chunk):
            rows = live[lo:lo + chunk]
            out._change(row_cells[rows] if row_cells is not None else None, label_idx[rows], weights[rows],
                        vectors(rows), +1)
        return out

    # -- changes --------------------------------------------------------------------------
    def append(self, cells: np.ndarray | None, label_idx: np.ndarray, weights: np.ndarray, vectors: np.ndarray) -> None:
        """Count appended rows (in table order) into their groups."""
        if self._cell is not None:
            self._cell.extend(cells)
        self._change(cells if self._cell is not None else None, label_idx, weights, vectors, +1)

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
        if new.any():  # insert empty groups, keeping keys sorted
            at = pos[new]
            self.keys = np.insert(self.keys, at, uniq[new])
            self.count = np.insert(self.count, at, 0)
            self.mass = np.insert(self.mass, at, 0.0)
            self.sums = np.insert(self.sums, at, 0.0, axis=0)
            pos = np.searchsorted(self.keys, uniq)
        self.count[pos] += sign * count
        self.mass[pos] += sign * mass
        self.sums[pos] += sign * sums
        empty = pos[self.count[pos] <= 0]  # exactly nothing left: no rounding residue
        self.count[empty], self.mass[empty], self.sums[empty] = 0, 0.0, 0.0
        self._derived = None

    # -- reads ----------------------------------------------------------------------------
    def _groups(self) -> "_Groups":
        """What queries read of the live groups, computed once after each change."""
        derived = self._derived
        if derived is None:
            with self._lock:
                live = self.mass > 0
                keys, mass, sums = self.keys[live], self.mass[live], self.sums[live]
                norm = np.linalg.norm(sums, axis=1)
                kappa = resultant = None
                if self.metric == "cosine":
                    resultant = np.minimum(norm / mass, 1.0)
                    kappa = kappa_from_resultant(resultant, self.dim)
                    unit, scale = sums / np.maximum(norm, 1e-300)[:, None], resultant
                else:
                    unit, scale = sums / mass[:, None], np.ones(len(mass))
                derived = self._derived = _Groups(keys, keys & ((1 << CELL_SHIFT) - 1), mass,
                                                  np.ascontiguousarray(unit.T, dtype=np.float32), scale,
                                                  resultant, kappa)
        return derived

    def estimate(self, q: np.ndarray, retrieved_groups: np.ndarray, retrieved_weights: np.ndarray,
                 retrieved_scores: np.ndarray, valid: np.ndarray, lowest: np.ndarray, shift: np.ndarray,
                 temperature: float, n_labels: int) -> np.ndarray:
        """(n, n_labels) estimated mass per label index of the slots each query left out,
        scaled by ``exp(-shift)`` (the caller's log-space offset).

        Every group is first estimated whole (one matrix product and a few elementwise
        steps per (query, group)); then the groups that hold retrieved slots, at most k
        per query, are estimated again without them and the difference is applied.

        Args:
            q: (n, dim) float32 checked queries.
            retrieved_groups: (n, k) group key of each retrieved slot.
            retrieved_weights, retrieved_scores: (n, k) masses and scores of the retrieved slots.
            valid: (n, k) which retrieved entries are slots (not padding).
            lowest: (n,) the lowest retrieved score (the cap of every slot left out).
            shift: (n,) log-space offset of the result.
        """
        grp = self._groups()
        out = np.zeros((len(q), n_labels))
        if len(grp.keys) == 0:
            return out
        inv_t = 1.0 / temperature
        for lo in range(0, len(q), 256):  # (256, groups) at a time
            hi = min(len(q), lo + 256)
            rows = np.arange(hi - lo)
            c = q[lo:hi] @ grp.unit_t  # q . mean direction (cosine) or q . mean (ip)
            cap = (lowest[lo:hi] * inv_t)[:, None]  # no slot left out scores above the lowest retrieved
            base = -shift[lo:hi, None]
            e = np.exp(np.minimum(self._log_model(grp, c, inv_t, None), cap) + grp.log_mass + base)
            flat = (grp.labels[None, :] + rows[:, None] * n_labels).ravel()
            part = np.bincount(flat, weights=e.ravel(), minlength=(hi - lo) * n_labels).reshape(hi - lo, n_labels)
            # the groups holding retrieved slots: estimated again without them
            ok = valid[lo:hi]
            qi = np.broadcast_to(rows[:, None], ok.shape)[ok]
            g = np.searchsorted(grp.keys, retrieved_groups[lo:hi][ok])
            pair, first = np.unique(qi * len(grp.keys) + g, return_index=True)  # distinct (query, group)
            taken_w = np.bincount(np.searchsorted(pair, qi * len(grp.keys) + g),
                                  weights=retrieved_weights[lo:hi][ok], minlength=len(pair))
            taken_ws = np.bincount(np.searchsorted(pair, qi * len(grp.keys) + g),
                                   weights=(retrieved_weights[lo:hi] * retrieved_scores[lo:hi])[ok],
                                   minlength=len(pair))
            pq, pg = pair // len(grp.keys), pair % len(grp.keys)
            left = grp.mass[pg] - taken_w
            keep = left > grp.mass[pg] * 1e-9
            q_sums = c[pq, pg] * grp.scale[pg] * grp.mass[pg]  # q . S
            mean_sim = np.where(keep, (q_sums - taken_ws) / np.where(keep, left, 1.0), 0.0)
            redo = np.minimum(self._log_model(grp, mean_sim, inv_t, pg), cap[pq, 0])
            new = np.where(keep, np.exp(redo + np.log(np.where(keep, left, 1.0)) + base[pq, 0]), 0.0)
            np.add.at(part, (pq, grp.labels[pg]), new - e[pq, pg])
            out[lo:hi] = np.maximum(part, 0.0)
        return out

    def _log_model(self, grp: "_Groups", c: np.ndarray, inv_t: float, at: np.ndarray | None) -> np.ndarray:
        """log of a group's mass estimate per unit of mass, from ``c``: q . mean direction
        (cosine; vMF) or q . mean (ip; first order). ``at``: the groups ``c`` belongs to (None: all)."""
        if grp.kappa is None:
            return c * inv_t
        kappa = grp.kappa if at is None else grp.kappa[at]
        if at is not None:  # c was given as q . mean: back to the mean direction
            c = np.clip(c / np.maximum(grp.resultant[at], 1e-12), -1.0, 1.0)
        return log_vmf_mgf(kappa, c, self.dim, inv_t)


class _Groups:
    """The live groups as a query reads them: keys, label indices, mass and its log, and the
    matrix the queries multiply (mean directions for cosine, means for ip; ``scale`` turns
    ``q . column`` into ``q . S / W``)."""

    __slots__ = ("keys", "labels", "mass", "log_mass", "unit_t", "scale", "resultant", "kappa")

    def __init__(self, keys, labels, mass, unit_t, scale, resultant, kappa):
        self.keys, self.labels, self.mass, self.log_mass = keys, labels, mass, np.log(mass)
        self.unit_t, self.scale, self.resultant, self.kappa = unit_t, scale, resultant, kappa
