"""The read side of the summaries: the estimated tail per class and its certificate
(see :mod:`engine.tail`), in float32, a chunk of queries at a time."""

from __future__ import annotations

import numpy as np

from .vmf import log_vmf_mgf

CHUNK = 64  # queries estimated at a time: (CHUNK, groups) float32 arrays


class Estimator:
    """What :class:`~engine.tail.summaries.Summaries` answers a query with (a mixin: it reads
    the summaries' ``metric``, ``dim``, ``n_cells`` and their derived ``_groups()``)."""

    def estimate(self, q: np.ndarray, retrieved_groups: np.ndarray, retrieved_weights: np.ndarray,
                 retrieved_scores: np.ndarray, valid: np.ndarray, lowest: np.ndarray, shift: np.ndarray,
                 temperature: float, columns: np.ndarray, n_columns: int,
                 capped=None) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, n_columns) estimated mass per class of the slots each query left out (a class's
        column is ``columns[label index]``), and
        (n,) a certificate: an upper bound on their total mass (None without ``capped``); both
        scaled by ``exp(-shift)`` (the caller's log-space offset).

        The certificate bounds each group by what is left of its mass times
        ``exp(u / T)``, ``u`` the most any of its slots can score: every slot it ever held
        lies within its reach of its fixed pivot, so ``u = cos(max(0, a - r))`` for a query at
        angle ``a`` from the pivot and a reach of angle ``r`` (cosine), or
        ``q . pivot + |q| reach`` (ip); and ``u <= s_k`` where the search saw every slot of
        the group (``capped``:
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
        if len(run_columns) and np.all(np.diff(run_columns) == 1):
            run_columns = slice(int(run_columns[0]), int(run_columns[-1]) + 1)  # one block: no scatter
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
            per_class = grp.per_class(e)
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

    def _certificate(self, grp: "GroupView", q, pq, pg, taken_w, lowest, shift, inv_t: float, capped) -> np.ndarray:
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

    def _bulk(self, grp: "GroupView", consts, c: np.ndarray, inv_t: float, cap: np.ndarray,
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

    def _log_model(self, grp: "GroupView", c: np.ndarray, inv_t: float, at: np.ndarray) -> np.ndarray:
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


class GroupView:
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
        # the r-th group of every class that has one, for r = 1, 2, ...: summing per class by a
        # few column gathers beats a reduceat over many short runs (6.4 ms against 2.7 ms for
        # 64 queries x 21k groups in 10k classes); a class spread over many cells takes reduceat
        sizes = np.diff(np.r_[self.class_starts, len(labels)])
        most = int(sizes.max()) if len(sizes) else 0
        self._rounds = None if most > 32 else [
            (np.flatnonzero(sizes > r), self.class_starts[sizes > r] + r) for r in range(1, most)]
        self._constants = {}

    def per_class(self, e: np.ndarray) -> np.ndarray:
        """(m, classes present) the sum of ``e`` (m, groups) over each class's run of groups."""
        if self._rounds is None:
            return np.add.reduceat(e, self.class_starts, axis=1)
        out = e[:, self.class_starts]
        for classes, groups in self._rounds:
            out[:, classes] += e[:, groups]
        return out

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
