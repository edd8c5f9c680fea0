"""Full-attention probabilities: exact where the search scored, estimated beyond it.

Three routes, by what the index scores:

- *every slot* (a Flat index, k covering the memory, or a batch of 64 IVF-Flat queries or
  more probing half the lists or more): the answer is dense attention, chunked over
  slots, in float64 up to 65,536 rows (float32 products beyond); nothing is estimated
  and ``tail_bound`` is 0;
- *whole lists* (IVF-Flat): the lists a query probes are found once (one product with
  the centroids), scanned by FAISS's own range search over exactly those lists (in chunks
  of queries holding at most 4M scored slots), and every slot in them counts exactly;
  only unprobed lists are estimated;
- *the top-k* (HNSW, codes, transforms): the retrieved slots count exactly; every cell of
  the memory's own partition is estimated, less what the query retrieved from it.

The rest's total is the sum of its cells' estimates, each capped at its mass times
``exp(s_k / T)``: what the search left out scores at most the k-th it found, as far as
its recall goes (calibrated for 0.98 of the top-64). Without the cap, a diffuse cell's
model (in few dimensions, at a small T) claims mass its few slots do not have. It goes to candidate classes,
each up to what its own vMF estimate exceeds its scored mass, and what is left is shared
by every class in proportion to its mass. Up to :data:`EVERY_CLASS` classes (and always
on the top-k route) every class is a candidate; beyond, only the classes the search
scored, so the answer (:class:`~engine.results.SparseProbs`) names those alone.

The certificate bounds what was not scored, cell by cell (its mass bound times
``exp(u / T)``, ``u`` the most a slot within its reach of the pivot can score), in log
space; it is 0 on the first route and a certificate on the others wherever scores are
exact. Every mass is taken relative to the query's best score, and the estimate to its
own largest term, so no temperature or mass overflows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..metric import lifted_query_sq
from ..results import SparseProbs
from .cells import CellView

CHUNK = 256  # queries estimated at a time
DENSE_CHUNK = 4096  # slots scored at a time by the dense route
DENSE_FLOAT64 = 65536  # up to this many rows the dense route scores in float64, beyond in float32
DENSE_SHARE = 2  # a batch of IVF-Flat queries probing half its lists or more scores every slot instead ...
DENSE_BATCH = 64  # ... if it has this many queries (a product over every slot is paid once a batch)
SCAN_RESULTS = 4_000_000  # scanned (query, slot) pairs held at once: the list route goes in chunks of queries
# up to this many classes each is a candidate for the estimated rest; above it only the classes
# the search scored are (the rest of the rest is shared by class mass)
EVERY_CLASS = 4096
MARGIN = 1e-5  # the certificate's margin above float32 rounding, in log units (plus 2.5e-7 / T)


@dataclass
class FullAnswer:
    """What a query result needs of a full answer."""

    scores: np.ndarray  # (n, k) float32, best first, -inf padding
    rows: np.ndarray  # (n, k) table rows, -1 padding
    attention: np.ndarray  # (n, k) share of the whole (estimated) attention of each top-k slot
    probs: np.ndarray | SparseProbs  # (n, C)
    tail_bound: np.ndarray  # (n,) bound on the share of attention that was not scored
    certified: bool  # whether tail_bound is a certificate (scores exact, masses bounded)
    # absolute log units, log sum w exp(s / T): what a merge of several memories' answers adds up
    log_z: np.ndarray  # (n,) the whole mass, scored plus estimated
    log_scored: np.ndarray  # (n,) the mass of the slots scored
    log_bound: np.ndarray  # (n,) the bound on the mass not scored (-inf: every slot was scored)

    def labels(self) -> np.ndarray:
        """The most probable column of each query."""
        if isinstance(self.probs, SparseProbs):
            return self.probs.argmax()
        return np.argmax(self.probs, axis=1)


def answer(state, vocab, q: np.ndarray, k: int, temperature: float, metric: str,
           nprobe: int | None = None) -> FullAnswer:
    """The full answer of each query (``k`` already clamped; ``nprobe`` overrides the
    index's breadth on the list route)."""
    index, table = state.index, state.table
    inv_t = 1.0 / temperature
    classes, columns = state.classes(vocab)
    if index.exact or k >= table.n_alive:
        return _dense(state, q, k, inv_t, len(classes), columns)
    if index.list_scan:
        nprobe = nprobe or index.breadth(k)[0]
        if DENSE_SHARE * nprobe >= index.nlist and len(q) >= DENSE_BATCH:  # one product beats the lists
            return _dense(state, q, k, inv_t, len(classes), columns)
        per_query = nprobe * table.n_rows / max(index.nlist, 1)  # slots a query scans
        step = max(1, int(SCAN_RESULTS // max(per_query, 1)))
        if step >= len(q):
            return _lists(state, q, k, inv_t, len(classes), columns, metric, nprobe)
        return _joined([_lists(state, q[lo:lo + step], k, inv_t, len(classes), columns, metric, nprobe)
                        for lo in range(0, len(q), step)])
    return _retrieved(state, q, k, inv_t, len(classes), columns, metric)


# -- routes ---------------------------------------------------------------------------------
def _dense(state, q, k, inv_t, n_classes, columns) -> FullAnswer:
    from ..query import search
    from . import kernels as compiled  # numba loads only where a full answer is asked for

    kernels = compiled.pick(len(q))

    table = state.table
    scores, rows = search(state, q, k)
    valid = rows >= 0
    q64 = q.astype(np.float64)
    wide = np.float64 if table.n_rows <= DENSE_FLOAT64 else np.float32  # float32 products: as FAISS scores
    qd = q.astype(wide)
    safe = np.where(valid, rows, 0)
    top = state.vectors(safe.ravel()).reshape(*rows.shape, -1).astype(np.float64)
    # l2: a lifted product less |q - c|^2 is -|q - x|^2 (engine.metric)
    q_sq = lifted_query_sq(q) if state.index.lifted else None
    s64 = np.einsum("nd,nkd->nk", q64, top)
    if q_sq is not None:
        s64 -= q_sq[:, None]
    s64 = np.where(valid, s64, -np.inf)
    log_shift = _finite(s64.max(axis=1) * inv_t)
    mass = np.zeros((len(q), n_classes))
    row_columns = np.where(table.alive, columns[table.label_idx], -1)
    weights = np.ascontiguousarray(table.weights, np.float64)
    q_sq_wide = None if q_sq is None else q_sq.astype(wide)[:, None]
    for lo in range(0, table.n_rows, DENSE_CHUNK):
        hi = min(table.n_rows, lo + DENSE_CHUNK)
        v = state.vectors(np.arange(lo, hi)).astype(wide)
        scored = qd @ v.T
        if q_sq_wide is not None:
            scored -= q_sq_wide
        kernels.add_dense(scored, row_columns[lo:hi], weights[lo:hi], inv_t, log_shift, mass)
    z = mass.sum(axis=1)
    att = _top_attention(table, s64, rows, valid, inv_t, log_shift, z)
    certified = not (state.index.lossy and not table.keep_vectors)  # scores from codes are not exact
    log_z = _log(z) + log_shift
    return FullAnswer(scores, rows, att, mass / z[:, None], np.zeros(len(q)), certified, log_z, log_z,
                      np.full(len(q), -np.inf))


def _lists(state, q, k, inv_t, n_classes, columns, metric, nprobe) -> FullAnswer:
    from . import kernels as compiled  # numba loads only where a full answer is asked for

    kernels = compiled.pick(len(q))

    table, index = state.table, state.index
    view = state.cells(metric).view()
    n, n_cells = len(q), view.n_cells
    nprobe = min(nprobe or index.breadth(k)[0], n_cells)
    near = q @ index.centroids_t  # q . centroid of every list: the coarse search, once
    probed = np.argpartition(-near, nprobe - 1, axis=1)[:, :nprobe] if nprobe < n_cells else \
        np.broadcast_to(np.arange(n_cells), (n, n_cells))
    probed = np.ascontiguousarray(probed, np.int64)
    lims, d, r = index.scan_lists(q, probed, np.take_along_axis(near, probed, 1),
                                  table.alive if table.n_dead else None)
    out_columns = np.empty(len(d), np.int64)
    out_values = np.empty(len(d))
    out_count = np.empty(n, np.int64)
    top_s, top_r = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    log_shift = np.empty(n)
    weights = np.empty(0) if table.unit_weights else np.ascontiguousarray(table.weights, np.float64)
    kernels.scan_scored(lims, d, r, state.row_columns(columns), weights, inv_t, k, n_classes,
                        max(1, min(n, 64)), out_columns, out_values, out_count, top_s, top_r, log_shift)
    keep = np.repeat(lims[:-1].astype(np.int64), out_count) + _ranks(out_count)
    pair_query = np.repeat(np.arange(n), out_count)
    exact = _Exact(pair_query, out_columns[keep], out_values[keep], n)
    unscored = np.ones((n, n_cells), bool)
    np.put_along_axis(unscored, probed, False, 1)
    valid = top_r >= 0
    lowest = np.where(valid, top_s, np.inf).min(axis=1).astype(np.float64)
    if view.spread is not None:  # l2 estimates what scored below the k-th: the scanned part of it is known
        safe = np.where(valid, top_r, 0)
        w_top = table.weights[safe] if not table.unit_weights else np.ones(safe.shape)
        e_top = w_top * np.exp(top_s.astype(np.float64) * inv_t - log_shift[:, None])
        qi = np.broadcast_to(np.arange(n)[:, None], top_r.shape)
        exact.set_top(qi[valid], state.row_columns(columns)[safe[valid]], e_top[valid], n_classes)
    probs, delta, log_bound = _rest(view, kernels, q, exact, unscored, None, inv_t, log_shift, lowest, columns)
    att = _top_attention(table, top_s.astype(np.float64), top_r, valid, inv_t, log_shift + delta, probs.z)
    return FullAnswer(top_s, top_r, att, probs.result, _share(log_bound, exact.total), not index.lossy,
                      _log(probs.z) + log_shift + delta, _log(exact.total) + log_shift, log_bound + log_shift)


def _retrieved(state, q, k, inv_t, n_classes, columns, metric) -> FullAnswer:
    from ..query import search
    from . import kernels as compiled  # numba loads only where a full answer is asked for

    kernels = compiled.pick(len(q))

    table = state.table
    scores, rows = search(state, q, k)
    n = len(q)
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    s64 = np.where(valid, scores, -np.inf).astype(np.float64)
    log_shift = _finite(s64.max(axis=1) * inv_t)
    w = table.weights[safe]
    e = np.where(valid, w * np.exp(s64 * inv_t - log_shift[:, None]), 0.0)
    qi = np.broadcast_to(np.arange(n)[:, None], rows.shape)
    key = qi[valid] * max(n_classes, 1) + columns[table.label_idx[safe[valid]]]
    pairs, inv = np.unique(key, return_inverse=True)
    exact = _Exact(pairs // max(n_classes, 1), pairs % max(n_classes, 1),
                   np.bincount(inv, weights=e[valid], minlength=len(pairs)), n)
    cells = state.cells(metric)
    view = cells.view()
    taken = (qi[valid], cells.cells_of(safe[valid]).astype(np.int64), w[valid], s64[valid])
    lowest = np.where(valid, s64, np.inf).min(axis=1)
    probs, delta, log_bound = _rest(view, kernels, q, exact, None, taken, inv_t, log_shift, lowest, columns)
    att = _top_attention(table, s64, rows, valid, inv_t, log_shift + delta, probs.z)
    certified = not (state.index.lossy and not table.keep_vectors)
    return FullAnswer(scores, rows, att, probs.result, _share(log_bound, exact.total), certified,
                      _log(probs.z) + log_shift + delta, _log(exact.total) + log_shift, log_bound + log_shift)


def _joined(parts: list[FullAnswer]) -> FullAnswer:
    """The answers of consecutive chunks of queries as one."""
    def rows(name):
        return np.concatenate([getattr(p, name) for p in parts])

    probs = [p.probs for p in parts]
    if all(isinstance(p, SparseProbs) for p in probs):
        offsets = np.cumsum([0] + [len(p.columns) for p in probs[:-1]])
        joined = SparseProbs(np.concatenate([probs[0].indptr[:1]] + [p.indptr[1:] + o for p, o in zip(probs, offsets)]),
                             np.concatenate([p.columns for p in probs]), np.concatenate([p.values for p in probs]),
                             np.concatenate([p.rest for p in probs]), probs[0].prior)
    else:
        joined = np.concatenate([p.dense() if isinstance(p, SparseProbs) else p for p in probs])
    return FullAnswer(rows("scores"), rows("rows"), rows("attention"), joined, rows("tail_bound"),
                      all(p.certified for p in parts), rows("log_z"), rows("log_scored"), rows("log_bound"))


# -- pieces ---------------------------------------------------------------------------------
class _Exact:
    """Each query's exactly scored mass per class, as (query, column, mass) pairs sorted by
    query, in the unit ``exp(log_shift)``."""

    def __init__(self, query, column, mass, n):
        self.query, self.column, self.mass = query, np.asarray(column, np.int64), mass
        self.total = np.bincount(query, weights=mass, minlength=n)
        self.indptr = np.r_[0, np.cumsum(np.bincount(query, minlength=n))]
        # of each pair's mass, what scored below the k-th score (scanned lists beyond the top-k;
        # the l2 estimate is of that part already): 0 where only the top-k was scored
        self.beyond = np.zeros(len(self.mass))

    def set_top(self, query, column, mass, n_classes: int) -> None:
        """The top-k's (query, column, mass): every pair's mass beyond it is the rest."""
        keys = np.asarray(query, np.int64) * max(n_classes, 1) + np.asarray(column, np.int64)
        top_keys, inv = np.unique(keys, return_inverse=True)
        top = np.bincount(inv, weights=mass, minlength=len(top_keys))
        if len(top_keys) == 0:
            return
        mine = self.query.astype(np.int64) * max(n_classes, 1) + self.column
        at = np.minimum(np.searchsorted(top_keys, mine), len(top_keys) - 1)
        within = np.where(top_keys[at] == mine, top[at], 0.0)
        self.beyond = np.maximum(self.mass - within, 0.0)


@dataclass
class _Probs:
    result: SparseProbs | np.ndarray
    z: np.ndarray  # (n,) the whole mass, in the unit exp(log_shift + delta)


def _rest(view: CellView, kernels, q, exact: _Exact, unscored, taken, inv_t, log_shift, lowest,
          columns) -> tuple[_Probs, np.ndarray, np.ndarray]:
    """(the probabilities, each query's extra log shift ``delta``, the log of the
    certificate on what was not scored, relative to ``log_shift``).

    ``unscored``: (n, cells) which cells were not scanned (None: every cell is estimated);
    ``taken``: (query, cell, mass, score) of slots scored outside whole scanned cells,
    taken out of their cells' estimates and bounds."""
    n = len(q)
    rest = np.zeros(n)
    log_bound = np.full(n, -np.inf)
    delta = np.zeros(n)
    margin = np.float32(2.5e-7 * inv_t + MARGIN)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        qc = q[lo:hi]
        shift32 = log_shift[lo:hi].astype(np.float32)[:, None]
        top = _most(view, qc, inv_t)  # u / T per cell
        est = _log_model(view.kappa, view.dim, qc @ view.unit_t, inv_t)
        if view.spread is not None:
            est = _log_gauss(est, lifted_query_sq(qc), view.spread, view.dim - 1, inv_t, lowest[lo:hi])
        np.minimum(est, top, out=est)  # no cell holds more than its bound allows ...
        np.minimum(est, (lowest[lo:hi] * inv_t).astype(np.float32)[:, None], out=est)  # ... nor beats s_k
        est += view.log_mass.astype(np.float32)
        est -= shift32
        top += view.log_mass_bound.astype(np.float32)
        top -= shift32
        if unscored is not None:
            est[~unscored[lo:hi]] = -np.inf
            top[~unscored[lo:hi]] = -np.inf
        est64, top64 = est.astype(np.float64), top.astype(np.float64)
        # the estimate's own largest term, if above the best score (or if nothing was scored:
        # then the shift of 0 is nobody's scale)
        d = _finite(est64.max(axis=1))
        d = np.where(np.isfinite(lowest[lo:hi]), np.maximum(d, 0.0), d)
        b = _finite(top64.max(axis=1))
        est64 = np.exp(est64 - d[:, None])
        bound = np.exp(top64 - b[:, None])
        if taken is not None:
            _take_out(view, qc, est64, bound, taken, lo, hi, inv_t, log_shift[lo:hi] + d, log_shift[lo:hi] + b,
                      lowest[lo:hi] * inv_t)
        with np.errstate(divide="ignore"):
            log_bound[lo:hi] = np.log(bound.sum(axis=1)) + b + margin
        rest[lo:hi] = est64.sum(axis=1)
        delta[lo:hi] = d
    label_of_column = np.flatnonzero(columns >= 0)  # columns number the live labels in order
    n_columns = len(label_of_column)
    with np.errstate(over="ignore"):  # a query that scored nothing may shift far down: its scored mass is 0
        scale = np.exp(-delta)
    scored = np.where(exact.total > 0, exact.total * np.where(exact.total > 0, scale, 0.0), 0.0)
    z = scored + rest
    z_safe = np.where(z > 0, z, 1.0)
    prior = np.maximum(view.label_mass[label_of_column], 0.0)
    prior /= max(prior.sum(), 1e-300)
    if taken is not None or n_columns <= EVERY_CLASS:  # every class a candidate: dense, in proportion
        return _Probs(_every_class(view, q, exact, scale, rest, z_safe, label_of_column, prior, inv_t,
                                   log_shift + delta, lowest), z_safe), delta, log_bound
    # the rest goes to the classes scored, each up to what its own estimate exceeds its scored mass,
    # and what they do not claim is shared by every class's mass
    have = exact.mass * scale[exact.query]
    groups = label_of_column[exact.column] if len(exact.column) else np.empty(0, np.int64)
    log_e = np.empty(len(groups))
    if view.label_spread is not None:  # l2: the Gaussian model per (query, class) pair
        c = np.einsum("nd,nd->n", q[exact.query].astype(np.float64), view.label_means[groups])
        log_e = _log_gauss(c * inv_t, lifted_query_sq(q)[exact.query], view.label_spread[groups], view.dim - 1, inv_t,
                           lowest[exact.query])
        log_e += view.label_log_mass64[groups]
    else:
        kernels.pair_log_mass(q, exact.query, groups, view.label_means, view.label_kappa_or_empty,
                              view.label_log_mass64, inv_t, max(view.dim / 2 - 1, 0.5), log_e)
    log_e = np.minimum(log_e, view.label_log_mass64[groups] + lowest[exact.query] * inv_t)  # nothing beats s_k
    log_e -= log_shift[exact.query] + delta[exact.query]
    # what each class's estimate exceeds its scored mass (l2: its estimate is of what scored below
    # the k-th, so the mass scanned there)
    scanned = have if view.label_spread is None else exact.beyond * scale[exact.query]
    excess = np.maximum(np.exp(log_e) - scanned, 0.0)
    claimed = np.bincount(exact.query, weights=excess, minlength=n)
    fill = np.where(claimed > rest, rest / np.maximum(claimed, 1e-300), 1.0)
    values = have + excess * fill[exact.query]
    spread = np.maximum(rest - claimed * fill, 0.0)
    probs = SparseProbs(exact.indptr, exact.column, values / z_safe[exact.query], spread / z_safe, prior)
    return _Probs(probs, z_safe), delta, log_bound


def _every_class(view: CellView, q, exact: _Exact, scale, rest, z, label_of_column, prior, inv_t, unit,
                 lowest) -> np.ndarray:
    """(n, C) probabilities when every class is a candidate for the rest: each class's vMF
    estimate (over all its slots) less its scored mass, scaled to the rest's total (float32,
    a chunk of queries at a time)."""
    n, n_columns = len(q), len(label_of_column)
    out = np.zeros((n, n_columns))
    np.add.at(out, (exact.query, exact.column), exact.mass * scale[exact.query])
    if view.label_spread is not None:  # l2: the mass scanned below the k-th score, per class
        beyond = np.zeros((n, n_columns))
        np.add.at(beyond, (exact.query, exact.column), exact.beyond * scale[exact.query])
    means_t = np.ascontiguousarray(view.label_means[label_of_column].T, np.float32)
    kappa = None if view.label_kappa is None else view.label_kappa[label_of_column]
    spread = None if view.label_spread is None else view.label_spread[label_of_column].astype(np.float32)
    log_mass = view.label_log_mass[label_of_column].astype(np.float32)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        e = _log_model(kappa, view.dim, q[lo:hi] @ means_t, inv_t)
        if spread is not None:
            e = _log_gauss(e, lifted_query_sq(q[lo:hi]), spread, view.dim - 1, inv_t, lowest[lo:hi])
        np.minimum(e, (lowest[lo:hi] * inv_t).astype(np.float32)[:, None], out=e)  # nothing beats s_k
        e += log_mass
        e -= unit[lo:hi].astype(np.float32)[:, None]
        part = out[lo:hi]
        # what each class's estimate exceeds its scored mass (l2: what scored below the k-th)
        # takes its share of the rest; in logs, so that no estimate overflows (a query that
        # scored nothing has no scale of its own)
        log_excess = _log_excess(e.astype(np.float64), part if spread is None else beyond[lo:hi])
        top = log_excess.max(axis=1)
        claimed = np.isfinite(top)
        share = np.exp(log_excess - np.where(claimed, top, 0.0)[:, None])
        share /= np.maximum(share.sum(axis=1, keepdims=True), 1e-300)
        part += np.where(claimed, rest[lo:hi], 0.0)[:, None] * share
        part += np.where(claimed, 0.0, rest[lo:hi])[:, None] * prior[None, :]  # none claims: by mass
        part /= z[lo:hi, None]
    return out


def _log_excess(log_estimate: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """log(max(exp(log_estimate) - scored, 0)) (-inf where nothing exceeds), without
    exponentiating the estimate."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(scored > 0, np.exp(np.log(np.maximum(scored, 1e-300)) - log_estimate), 0.0)
        return np.where(ratio < 1, log_estimate + np.log1p(-np.minimum(ratio, 1.0)), -np.inf)


def _share(log_bound, scored) -> np.ndarray:
    """The share of the attention a bound on the unscored mass allows it: B / (S + B)."""
    with np.errstate(divide="ignore", over="ignore"):
        log_s = np.log(scored)
        out = 1.0 / (1.0 + np.exp(log_s - log_bound))
    return np.where(np.isnan(out), np.where(np.isneginf(log_bound), 0.0, 1.0), out)


def _top_attention(table, s64, rows, valid, inv_t, log_shift, z):
    w = table.weights[np.where(valid, rows, 0)]
    with np.errstate(invalid="ignore"):
        return np.where(valid, w * np.exp(s64 * inv_t - log_shift[:, None]), 0.0) / z[:, None]


def _log(x):
    with np.errstate(divide="ignore"):
        return np.log(x)


def _finite(x):
    return np.where(np.isfinite(x), x, 0.0)


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c-1 for each count c, concatenated."""
    counts = np.asarray(counts, np.int64)
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def _most(view: CellView, q, inv_t: float) -> np.ndarray:
    """(n, cells) float32: the most a slot of each cell can score, over T (from its pivot and
    reach, with a margin above float32 rounding)."""
    c = q @ view.pivot_t
    if view.metric == "cosine":  # q at angle a from the pivot, slots within angle r: q.z <= cos(a - r)
        far = np.sqrt(np.maximum(np.float32(1) - c * c, np.float32(0)))
        far *= view.sin_reach32
        inside = c >= view.reach32
        c *= view.reach32
        c += far
        np.copyto(c, np.float32(1), where=inside)
        c += view.slack
        np.minimum(c, np.float32(1), out=c)
    else:
        c += np.linalg.norm(q, axis=1).astype(np.float32)[:, None] * (view.reach32 + view.slack)
        if view.spread is not None:  # l2: a lifted product less |q - c|^2 is -|q - x|^2
            c -= lifted_query_sq(q).astype(np.float32)[:, None]
    c *= np.float32(inv_t)
    return c


def _log_model(kappa, dim: int, c: np.ndarray, inv_t: float) -> np.ndarray:
    """log of a group's attention mass per unit of mass, from ``c`` = q . its mean
    direction (cosine, concentrations ``kappa``: the vMF moment generating function of
    :func:`engine.tail.vmf.log_vmf_mgf`) or q . its mean (ip, ``kappa`` None: first
    order); float32, in place in ``c``."""
    if kappa is None:
        c *= np.float32(inv_t)
        return c
    nu = max(dim / 2 - 1, 0.5)
    kappa = kappa.astype(np.float32)
    b = np.sqrt(np.float32(nu * nu) + kappa * kappa)
    c *= np.float32(2 * inv_t) * kappa
    c += np.float32(inv_t * inv_t)  # r^2 - kappa^2
    a = b * b + c
    np.maximum(a, 0, out=a)
    np.sqrt(a, out=a)
    a += b
    np.divide(c, a, out=c)  # A - B
    np.divide(c, nu + b, out=a)
    np.log1p(a, out=a)
    a *= np.float32(nu)
    d = c / b
    np.log1p(d, out=d)
    d *= np.float32(0.5)
    c -= a
    c -= d
    return c


def _log_gauss(first, q_sq, spread, dim: int, inv_t: float, lowest):
    """l2: log of the attention mass, per unit of mass, of a group's slots that score below
    ``lowest`` (the k-th score -|q - x_k|^2: what the search left out), when they spread
    around their mean as an isotropic Gaussian; in score units (-|q - x|^2 / T).

    ``first`` = q'.mean' / T, the lifted first-order term (float32, or float64); ``q_sq`` =
    |q - c|^2 and ``lowest`` per query; ``spread`` = mean |x - mean|^2 per group, over
    ``dim`` dimensions. With per-dimension variance v = spread / dim and a = 2 v / T, the
    whole group's E exp(-|q - x|^2 / T) is (1 + a)^(-dim/2) exp(-|q - mean|^2 / (T (1 + a))),
    where |q - mean|^2 = |q - c|^2 - q'.mean' - spread. Weighted by exp(-|q - x|^2 / T), x is
    again Gaussian (variance v / (1 + a), its mean pulled towards q), so the part beyond the
    k-th distance r (|q - x|^2 >= r^2 = -lowest) is a noncentral chi-square tail, taken by
    Sankaran's normal approximation. It is never above the whole group's."""
    dtype = np.asarray(first).dtype
    first64 = np.asarray(first, np.float64)
    spread = np.asarray(spread, np.float64)
    q_sq, lowest = np.asarray(q_sq, np.float64), np.asarray(lowest, np.float64)
    if first64.ndim == 2:
        q_sq, lowest = q_sq[:, None], lowest[:, None]
    t = 1.0 / inv_t
    v = spread / dim
    a = 2 * v * inv_t
    dist = np.maximum(q_sq - first64 * t - spread, 0.0)  # |q - mean|^2
    whole = -dist * inv_t / (1 + a) - (dim / 2) * np.log1p(a)
    r2 = np.maximum(-lowest, 0.0)
    point = v <= 1e-12 * np.maximum(dist + r2, 1e-300)
    v_safe = np.where(point, 1.0, v)
    lam = dist / (v_safe * (1 + a))  # noncentrality of |q - x|^2 / v' under the tilted Gaussian
    x = r2 * (1 + a) / v_safe
    k = float(dim)
    h = 1 - (2 / 3) * (k + lam) * (k + 3 * lam) / (k + 2 * lam) ** 2
    p = (k + 2 * lam) / (k + lam) ** 2
    m = (h - 1) * (1 - 3 * h)
    z = (((x / (k + lam)) ** h - (1 + h * p * (h - 1 - 0.5 * (2 - h) * m * p)))
         / (h * np.sqrt(2 * p) * (1 + 0.5 * m * p)))
    beyond = np.where(point, np.where(dist >= r2, 0.0, -np.inf), _log_upper_normal(z))
    return (whole + beyond).astype(dtype)


def _log_upper_normal(z):
    """log P(N(0, 1) > z), within about 0.3% (Borjesson and Sundberg's form)."""
    z = np.asarray(z, np.float64)
    u = np.abs(z)
    log_q = -u * u / 2 - np.log((0.661 * u + 0.339 * np.sqrt(u * u + 5.51)) * np.sqrt(2 * np.pi))
    with np.errstate(divide="ignore"):
        return np.where(z >= 0, log_q, np.log1p(-np.exp(log_q)))


def _take_out(view: CellView, q, est, bound, taken, lo, hi, inv_t, est_shift, bound_shift, cap) -> None:
    """Estimate again, without the slots a query scored, the cells those slots lie in
    (``est`` and ``bound`` are linear, in the units ``exp(est_shift)`` and ``exp(bound_shift)``;
    ``cap``: s_k / T per query)."""
    qi, cell, w, s = taken
    sel = (qi >= lo) & (qi < hi)
    qi, cell, w, s = qi[sel] - lo, cell[sel], w[sel], s[sel]
    if len(qi) == 0:
        return
    n_cells = view.n_cells
    pair, inv = np.unique(qi * n_cells + cell, return_inverse=True)
    pq, pc = pair // n_cells, pair % n_cells
    taken_w = np.bincount(inv, weights=w, minlength=len(pair))
    taken_ws = np.bincount(inv, weights=w * s, minlength=len(pair))
    mass = np.exp(view.log_mass[pc])
    left = mass - taken_w
    keep = left > mass * 1e-9
    left_safe = np.where(keep, left, 1.0)
    c = np.einsum("nd,nd->n", q[pq].astype(np.float64), view.unit_t[:, pc].T.astype(np.float64))
    if view.kappa is not None:
        whole_sim = c * view.resultant[pc]  # q . S / W
        mean = np.clip((whole_sim * mass - taken_ws) / left_safe / np.maximum(view.resultant[pc], 1e-12), -1, 1)
        from .vmf import log_vmf_mgf

        log_e = log_vmf_mgf(view.kappa[pc], mean, view.dim, inv_t)
    elif view.spread is not None:  # l2: the cell's slots beyond the k-th score (what was not scored), per unit left
        log_e = _log_gauss(c * inv_t, lifted_query_sq(q)[pq], view.spread[pc], view.dim - 1, inv_t, cap[pq] / inv_t) \
            + np.log(mass / left_safe)
    else:
        log_e = (c * mass - taken_ws) / left_safe * inv_t
    whole_bound = np.exp(view.log_mass_bound[pc])
    scale = np.where(whole_bound > 0, np.maximum(whole_bound - taken_w, 0.0) / np.maximum(whole_bound, 1e-300), 0.0)
    bound[pq, pc] *= scale  # each slot left still scores at most u: its mass is what is left
    with np.errstate(divide="ignore"):
        ceiling = np.log(bound[pq, pc]) + bound_shift[pq] - est_shift[pq]
    model = np.minimum(log_e, cap[pq]) + np.log(left_safe) - est_shift[pq]
    est[pq, pc] = np.where(keep, np.exp(np.minimum(model, ceiling)), 0.0)
