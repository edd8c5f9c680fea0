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
CHUNK = 64  # queries estimated at a time: (CHUNK, groups) float32 arrays


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


def partition_size(n: int) -> int:
    """Cells of a partition made for ``n`` slots (an index without lists): about 2 sqrt(n),
    each trained on 64 points or more; 1 below 4,096 slots."""
    from .index import auto_nlist

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
        self.assign = None  # vectors -> their cells (with more than one cell)
        self.trained_on, self.own_partition = 0, False
        self._cell = _Growable(np.int32) if n_cells > 1 else None  # each table row's cell
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
    def _groups(self) -> "_Groups":
        """What queries read of the live groups, computed once after each change."""
        derived = self._derived
        if derived is None:
            with self._lock:
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
                derived = self._derived = _Groups(keys, at, labels, mass, np.ascontiguousarray(unit.T, np.float32),
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

    def estimate(self, q: np.ndarray, retrieved_groups: np.ndarray, retrieved_weights: np.ndarray,
                 retrieved_scores: np.ndarray, valid: np.ndarray, lowest: np.ndarray, shift: np.ndarray,
                 temperature: float, columns: np.ndarray, n_columns: int,
                 capped=None) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, n_columns) estimated mass per class of the slots each query left out (a class's
        column is ``columns[label index]``), and
        (n,) a certificate: an upper bound on their total mass (None without ``capped``); both
        scaled by ``exp(-shift)`` (the caller's log-space offset).

        The certificate bounds each group by what is left of its mass times
        ``exp(u / T)``, ``u`` the most any of its slots can score: ``q . pivot + |q| radius``
        (every slot it ever held lies within ``radius`` of its fixed ``pivot``), at most 1 for
        cosine, and at most ``s_k`` where the search saw every slot of the group (``capped``:
        "all" for an exhaustive search, "none" where the search may have missed any slot, else
        each query's probed cells, (n, nprobe)).

        Every group is first estimated whole: one matrix product and about fifteen
        in-place float32 steps per (query, group), then a sum over each class's run of
        groups. The groups that hold retrieved slots, at most k per query, are then
        estimated again in float64 without them, and the difference is applied.

        Args:
            q: (n, dim) float32 checked queries.
            retrieved_groups: (n, k) group key of each retrieved slot.
            retrieved_weights, retrieved_scores: (n, k) masses and scores of the retrieved slots.
            valid: (n, k) which retrieved entries are slots (not padding).
            lowest: (n,) the lowest retrieved score (the cap of every slot left out).
            shift: (n,) log-space offset of the result.
            capped: where ``s_k`` caps the certificate (see above); None: no certificate.
        """
        grp = self._groups()
        out = np.zeros((len(q), n_columns))
        bound = None if capped is None else np.zeros(len(q))
        if len(grp.keys) == 0:
            return out, bound
        run_columns = columns[grp.class_labels]  # every live group's class has a column
        group_columns = columns[grp.labels]
        inv_t = 1.0 / temperature
        consts = grp.constants(inv_t)
        def chunk(lo: int) -> None:
            hi = min(len(q), lo + CHUNK)
            rows = np.arange(hi - lo)
            c = q[lo:hi] @ grp.unit_t  # q . mean direction (cosine) or q . mean (ip)
            # the groups holding retrieved slots, as (query, group) pairs
            ok = valid[lo:hi]
            qi = np.broadcast_to(rows[:, None], ok.shape)[ok]
            g = grp.at[np.minimum(np.searchsorted(grp.keys, retrieved_groups[lo:hi][ok]), len(grp.keys) - 1)]
            pair_of = qi * len(grp.keys) + g
            pair = np.unique(pair_of)
            pq, pg = pair // len(grp.keys), pair % len(grp.keys)
            c_pairs = c[pq, pg].astype(np.float64)
            cap = (lowest[lo:hi] * inv_t).astype(np.float32)[:, None]  # nothing left out scores above s_k
            base = (-shift[lo:hi]).astype(np.float32)[:, None]
            e = self._bulk(grp, consts, c, inv_t, cap, base)
            e_pairs = e[pq, pg].astype(np.float64)
            per_class = np.add.reduceat(e, grp.class_starts, axis=1)
            # ... estimated again without their retrieved slots
            slot = np.searchsorted(pair, pair_of)
            taken_w = np.bincount(slot, weights=retrieved_weights[lo:hi][ok], minlength=len(pair))
            taken_ws = np.bincount(slot, weights=(retrieved_weights[lo:hi] * retrieved_scores[lo:hi])[ok],
                                   minlength=len(pair))
            left = grp.mass[pg] - taken_w
            keep = left > grp.mass[pg] * 1e-9
            left_safe = np.where(keep, left, 1.0)
            mean_sim = (c_pairs * grp.scale[pg] * grp.mass[pg] - taken_ws) / left_safe  # q . S' / W'
            redo = np.minimum(self._log_model(grp, mean_sim, inv_t, pg), lowest[lo:hi][pq] * inv_t)
            new = np.where(keep, np.exp(redo + np.log(left_safe) - shift[lo:hi][pq]), 0.0)
            part = out[lo:hi]
            part[:, run_columns] = per_class
            np.add.at(part, (pq, group_columns[pg]), new - e_pairs)
            np.maximum(part, 0.0, out=part)
            if capped is not None:
                bound[lo:hi] = self._certificate(grp, q[lo:hi], pq, pg, taken_w, lowest[lo:hi], shift[lo:hi],
                                                 inv_t, capped if isinstance(capped, str) else capped[lo:hi])

        for lo in range(0, len(q), CHUNK):  # (threads over chunks were slower: BLAS and memory are shared)
            chunk(lo)
        return out, bound

    def _certificate(self, grp: "_Groups", q, pq, pg, taken_w, lowest, shift, inv_t: float, capped) -> np.ndarray:
        """(n,) the certificate of :meth:`estimate` for one chunk of queries.

        In float32, in place, with each query's terms taken relative to ``s_k``; the sum is
        then raised by a margin well above float32's rounding at this temperature."""
        n = len(q)
        low32 = lowest.astype(np.float32)[:, None]
        top = q @ grp.pivot_t
        if self.metric == "cosine":  # q at angle a from the pivot, slots within angle r: q.z <= cos(a - r)
            c = top
            far = np.sqrt(np.maximum(np.float32(1) - c * c, np.float32(0)))
            far *= grp.sin_r32
            inside = c >= grp.radius32
            c *= grp.radius32
            c += far
            np.copyto(c, np.float32(1), where=inside)
            c += grp.slack
            np.minimum(c, np.float32(1), out=c)
        else:
            top += np.linalg.norm(q, axis=1).astype(np.float32)[:, None] * (grp.radius32 + grp.slack)
        if isinstance(capped, str):
            if capped == "all":  # every slot was searched: none left out scores above s_k
                np.minimum(top, low32, out=top)
        else:  # the groups of each query's probed cells
            cells = np.maximum(capped, 0)
            size = grp.cell_count[cells]
            qs = np.repeat(np.arange(n), size.sum(axis=1))
            gs = grp.cell_order[np.repeat(grp.cell_start[cells].ravel(), size.ravel()) + _ranks(size.ravel())]
            top[qs, gs] = np.minimum(top[qs, gs], low32[qs, 0])
        touched = top[pq, pg]
        top -= low32
        top *= np.float32(inv_t)
        top += grp.log_mass_bound32
        base = (lowest * inv_t - shift).astype(np.float32)
        top += base[:, None]
        left = np.maximum(grp.mass_bound[pg] - taken_w, 0.0)  # what the retrieved slots leave of a group
        with np.errstate(divide="ignore"):
            top[pq, pg] = ((touched - low32[pq, 0]) * np.float32(inv_t) + np.log(left) + base[pq]).astype(np.float32)
        m = top.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, np.float32(0))
        top -= m
        np.exp(top, out=top)
        margin = np.exp(2.5e-7 * inv_t + 1e-5)
        return np.exp(m[:, 0].astype(np.float64)) * top.sum(axis=1, dtype=np.float64) * margin

    def _bulk(self, grp: "_Groups", consts, c: np.ndarray, inv_t: float, cap: np.ndarray,
              base: np.ndarray) -> np.ndarray:
        """exp(min(log model, cap) + log mass + base) of every (query, group), in place in ``c``
        (float32): the vMF formula of :func:`log_vmf_mgf` with its per-group terms precomputed."""
        if grp.kappa is None:
            c *= np.float32(inv_t)
        else:
            k2t, b2, b, inv_nub, inv_b, nu = consts
            c *= k2t
            c += np.float32(inv_t * inv_t)  # r^2 - kappa^2
            a = b2 + c
            np.sqrt(a, out=a)
            a += b
            np.divide(c, a, out=c)  # A - B
            np.multiply(c, inv_nub, out=a)
            np.log1p(a, out=a)
            a *= np.float32(nu)
            c -= a
            np.multiply(c + a, inv_b, out=a)  # (A - B) / B
            np.log1p(a, out=a)
            a *= np.float32(0.5)
            c -= a
        np.minimum(c, cap, out=c)
        c += grp.log_mass32
        c += base
        return np.exp(c, out=c)

    def _log_model(self, grp: "_Groups", c: np.ndarray, inv_t: float, at: np.ndarray) -> np.ndarray:
        """log of the mass estimate per unit of mass of groups ``at``, from ``c`` = q . their
        mean (float64): vMF for cosine, first order for ip."""
        if grp.kappa is None:
            return c * inv_t
        c = np.clip(c / np.maximum(grp.resultant[at], 1e-12), -1.0, 1.0)  # q . mean direction
        return log_vmf_mgf(grp.kappa[at], c, self.dim, inv_t)


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c-1 for each count c, concatenated."""
    counts = np.asarray(counts, np.int64)
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


class _Groups:
    """The live groups as a query reads them, in class order (a class's groups are a run):
    key order ``keys`` and ``at`` (a key's position in class order), label indices, mass,
    and the matrix the queries multiply (mean directions for cosine, means for ip; ``scale``
    turns ``q . column`` into ``q . S / W``)."""

    def __init__(self, keys, at, labels, mass, unit_t, scale, resultant, kappa, dim):
        self.keys, self.at, self.labels, self.mass = keys, at, labels, mass
        self.log_mass32 = np.log(mass).astype(np.float32)
        self.unit_t, self.scale, self.resultant, self.kappa, self.dim = unit_t, scale, resultant, kappa, dim
        self.class_starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(labels) else labels
        self.class_labels = labels[self.class_starts]
        self._constants = {}

    def constants(self, inv_t: float):
        """The per-group float32 terms of the vMF formula at 1/T (cached per temperature)."""
        if self.kappa is None:
            return None
        got = self._constants.get(inv_t)
        if got is None:
            nu = max(self.dim / 2 - 1, 0.5)
            b = np.sqrt(nu * nu + self.kappa * self.kappa)
            got = (np.float32(2 * inv_t) * self.kappa.astype(np.float32), (b * b).astype(np.float32),
                   b.astype(np.float32), (1 / (nu + b)).astype(np.float32), (1 / b).astype(np.float32), nu)
            self._constants = {inv_t: got}
        return got


def log_vmf_mgf_torch(kappa, c, dim: int, inv_t):
    """:func:`log_vmf_mgf` in torch (autograd through ``kappa``, ``c`` and ``inv_t``)."""
    import torch

    nu = max(dim / 2 - 1, 0.5)
    r2_k2 = 2 * inv_t * kappa * c + inv_t * inv_t
    b = torch.sqrt(nu * nu + kappa * kappa)
    a_b = r2_k2 / (torch.sqrt(torch.clamp(b * b + r2_k2, min=0.0)) + b)
    return a_b - nu * torch.log1p(a_b / (nu + b)) - 0.5 * torch.log1p(a_b / b)


def class_tail_torch(h, g, support_idx, top, scores, n_classes: int, temperature):
    """(n, C) log of the estimated attention mass per class of the support slots each query
    did not retrieve: one group per class (an episode's support is small), a vMF per group
    as in :class:`Summaries`, the retrieved slots taken out, capped at ``s_k``. Torch, with
    autograd through the query and support embeddings and the temperature.

    Args:
        h: (n, d) unit query embeddings.
        g: (m, d) unit support embeddings.
        support_idx: (m,) class index of each support slot.
        top: (n, k) retrieved support rows.
        scores: (n, k) their similarities (h . g[top]).
        n_classes: C.
        temperature: T (float or 0-d tensor).
    """
    import torch

    onehot = torch.nn.functional.one_hot(support_idx, n_classes).to(g.dtype)  # (m, C)
    mass = onehot.sum(0)  # (C,)
    sums = onehot.T @ g  # (C, d)
    taken = torch.zeros(len(h), n_classes, dtype=g.dtype, device=g.device)
    taken.scatter_add_(1, support_idx[top], torch.ones_like(scores))
    taken_s = torch.zeros_like(taken).scatter_add_(1, support_idx[top], scores)
    left = mass[None, :] - taken
    inv_t = 1.0 / temperature
    resultant = torch.clamp(sums.norm(dim=1) / torch.clamp(mass, min=1.0), max=1 - 1e-6)
    kappa = resultant * (h.shape[1] - resultant**2) / (1 - resultant**2)
    mean_sim = (h @ sums.T - taken_s) / torch.clamp(left, min=1.0)  # q . (mean of what is left)
    c = torch.clamp(mean_sim / torch.clamp(resultant, min=1e-6)[None, :], -1.0, 1.0)
    log_e = torch.minimum(log_vmf_mgf_torch(kappa[None, :], c, h.shape[1], inv_t),
                          scores.min(dim=1, keepdim=True).values * inv_t)
    return torch.where(left > 0.5, torch.log(torch.clamp(left, min=1.0)) + log_e,
                       torch.full_like(log_e, -torch.inf))
