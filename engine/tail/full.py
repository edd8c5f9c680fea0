"""Full-attention probabilities: exact where the search scored, estimated beyond it.

Three routes, by what the index scores:

- *every slot* (a Flat index, or k covering the memory): the answer is dense attention,
  in float64, chunked over slots; nothing is estimated and ``tail_bound`` is 0;
- *whole lists* (IVF-Flat): the lists a query probes are found once (one product with
  the centroids), scanned by FAISS's own range search over exactly those lists, and every
  slot in them counts exactly; only unprobed lists are estimated;
- *the top-k* (HNSW, codes, transforms): the retrieved slots count exactly; every cell of
  the memory's own partition is estimated, less what the query retrieved from it.

The rest's total is the sum of its cells' estimates; it is shared among classes by
what each class's own estimate exceeds the mass already scored of it. The certificate bounds what was not scored, cell by cell (its mass
bound times ``exp(u / T)``, ``u`` the most a slot within its reach of the pivot can
score); it is exact for the first route (0) and a certificate for the others wherever
scores are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cells import CellView

CHUNK = 256  # queries estimated at a time
DENSE_CHUNK = 4096  # slots scored at a time by the dense route


@dataclass
class FullAnswer:
    """What a query result needs of a full answer (every mass in the query's own unit)."""

    scores: np.ndarray  # (n, k) float32, best first, -inf padding
    rows: np.ndarray  # (n, k) table rows, -1 padding
    attention: np.ndarray  # (n, k) share of the whole (estimated) attention of each top-k slot
    probs: np.ndarray  # (n, C)
    tail_bound: np.ndarray  # (n,) bound on the share of attention that was not scored
    certified: bool  # whether tail_bound is a certificate (scores exact, masses bounded)
    scored: np.ndarray  # (n,) share of the attention that was scored exactly


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
        return _lists(state, q, k, inv_t, len(classes), columns, metric, nprobe)
    return _retrieved(state, q, k, inv_t, len(classes), columns, metric)


# -- routes ---------------------------------------------------------------------------------
def _dense(state, q, k, inv_t, n_classes, columns) -> FullAnswer:
    from ..query import search

    table = state.table
    scores, rows = search(state, q, k)
    valid = rows >= 0
    q64 = q.astype(np.float64)
    safe = np.where(valid, rows, 0)
    s64 = np.where(valid, np.einsum("nd,nkd->nk", q64, state.vectors(safe.ravel()).reshape(*rows.shape, -1)
                                    .astype(np.float64)), -np.inf)
    log_shift = np.where(valid, s64, -np.inf).max(axis=1) * inv_t
    log_shift = np.where(np.isfinite(log_shift), log_shift, 0.0)
    mass = np.zeros((len(q), n_classes))
    row_columns = np.where(table.alive, columns[table.label_idx], -1)
    weights = np.ascontiguousarray(table.weights, np.float64)
    from . import kernels  # numba loads only where a full answer is asked for

    for lo in range(0, table.n_rows, DENSE_CHUNK):
        hi = min(table.n_rows, lo + DENSE_CHUNK)
        v = state.vectors(np.arange(lo, hi)).astype(np.float64)
        kernels.add_dense(q64 @ v.T, row_columns[lo:hi], weights[lo:hi], inv_t, log_shift, mass)
    z = mass.sum(axis=1)
    att = _top_attention(table, s64, rows, valid, inv_t, log_shift, z)
    return FullAnswer(scores, rows, att, mass / z[:, None], np.zeros(len(q)), True, np.ones(len(q)))


def _lists(state, q, k, inv_t, n_classes, columns, metric, nprobe) -> FullAnswer:
    table, index = state.table, state.index
    cells = state.cells(metric)
    view = cells.view()
    n = len(q)
    nprobe = min(nprobe or index.breadth(k)[0], view.n_cells)
    near = q @ index.centroids_t  # q . centroid of every list: the coarse search, once
    probed = np.argpartition(-near, nprobe - 1, axis=1)[:, :nprobe] if nprobe < view.n_cells else \
        np.broadcast_to(np.arange(view.n_cells), (n, view.n_cells))
    probed = np.ascontiguousarray(probed, np.int64)
    lims, d, r = index.scan_lists(q, probed, np.take_along_axis(near, probed, 1),
                                  table.alive if table.n_dead else None)
    mass, top_s, top_r, log_shift = _scan(state, lims, d, r, inv_t, k, n_classes, columns)
    scored = mass.sum(axis=1)
    unprobed = np.ones((n, view.n_cells), bool)
    np.put_along_axis(unprobed, probed, False, 1)
    pivot_cos = near * index.inv_centroid_norm if metric == "cosine" else None
    est_total, bound = _estimate(view, q, unprobed, None, inv_t, log_shift, scored, columns, mass,
                                 pivot_cos=pivot_cos)
    z = scored + est_total
    valid = top_r >= 0
    att = _top_attention(table, top_s.astype(np.float64), top_r, valid, inv_t, log_shift, z)
    certified = not index.lossy
    return FullAnswer(top_s, top_r, att, mass / z[:, None], _share(bound, scored), certified, scored / z)


def _retrieved(state, q, k, inv_t, n_classes, columns, metric) -> FullAnswer:
    from ..query import search

    table = state.table
    scores, rows = search(state, q, k)
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    s64 = np.where(valid, scores, -np.inf).astype(np.float64)
    log_shift = s64.max(axis=1) * inv_t
    log_shift = np.where(np.isfinite(log_shift), log_shift, 0.0)
    w = table.weights[safe]
    e = np.where(valid, w * np.exp(s64 * inv_t - log_shift[:, None]), 0.0)
    mass = np.zeros((len(q), n_classes))
    qi = np.broadcast_to(np.arange(len(q))[:, None], rows.shape)
    np.add.at(mass, (qi[valid], columns[table.label_idx[safe[valid]]]), e[valid])
    scored = mass.sum(axis=1)
    cells = state.cells(metric)
    view = cells.view()
    taken = (qi[valid], cells.cells_of(safe[valid]).astype(np.int64), w[valid], s64[valid])
    est_total, bound = _estimate(view, q, None, taken, inv_t, log_shift, scored, columns, mass)
    z = scored + est_total
    att = _top_attention(table, s64, rows, valid, inv_t, log_shift, z)
    certified = not (state.index.lossy and not table.keep_vectors)
    return FullAnswer(scores, rows, att, mass / z[:, None], _share(bound, scored), certified, scored / z)


# -- pieces ---------------------------------------------------------------------------------
def _scan(state, lims, d, r, inv_t, k, n_classes, columns):
    table = state.table
    n = len(lims) - 1
    mass = np.zeros((n, n_classes))
    top_s = np.empty((n, k), np.float32)
    top_r = np.empty((n, k), np.int64)
    log_shift = np.empty(n)
    weights = np.empty(0) if table.unit_weights else np.ascontiguousarray(table.weights, np.float64)
    from . import kernels  # numba loads only where a full answer is asked for

    kernels.scan_scored(lims, d, r, state.row_columns(columns), weights, inv_t, k, mass, top_s, top_r, log_shift)
    log_shift = np.where(np.isfinite(log_shift), log_shift, 0.0)
    return mass, top_s, top_r, log_shift


def _top_attention(table, s64, rows, valid, inv_t, log_shift, z):
    w = table.weights[np.where(valid, rows, 0)]
    with np.errstate(invalid="ignore"):
        return np.where(valid, w * np.exp(s64 * inv_t - log_shift[:, None]), 0.0) / z[:, None]


def _share(bound, scored):
    """The share of the attention a bound on the unscored mass allows it (1 if unbounded)."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = bound / (scored + bound)
    return np.where(np.isfinite(bound), np.nan_to_num(out, nan=1.0), 1.0)


def _estimate(view: CellView, q, unscored, taken, inv_t, log_shift, scored, columns, mass, *,
              pivot_cos=None) -> tuple[np.ndarray, np.ndarray]:
    """Estimate each query's unscored rest, add it to ``mass`` per class (in place), and
    return (the estimated total, the certificate), both in the query's unit.

    The rest's total is the sum of its cells' estimates; it is shared among the classes in
    proportion to what each class's own vMF estimate (over all its slots) exceeds the mass
    scored of it, or by class mass where no class exceeds it.

    ``unscored``: (n, cells) which cells were not scanned (None: every cell is estimated);
    ``taken``: (query, cell, mass, score) of slots scored outside whole scanned cells,
    taken out of their cells' estimates and bounds."""
    n = len(q)
    est_total, bound = np.zeros(n), np.zeros(n)
    n_labels = min(len(view.label_mass), len(columns))
    labels = np.flatnonzero((columns[:n_labels] >= 0) & (view.label_mass[:n_labels] > 0))
    label_cols = columns[labels]
    prior = np.zeros(mass.shape[1])
    prior[label_cols] = view.label_mass[labels]
    prior /= max(prior.sum(), 1e-300)
    label_t = view.label_unit_t[:, labels]
    label_kappa = None if view.label_kappa is None else view.label_kappa[labels]
    label_log_mass = view.label_log_mass[labels]
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        qc = q[lo:hi]
        shift32 = log_shift[lo:hi].astype(np.float32)[:, None]
        top = _most(view, qc, None if pivot_cos is None else pivot_cos[lo:hi], inv_t)  # u / T per cell
        est = _log_model(view.kappa, view.dim, qc @ view.unit_t, inv_t)
        np.minimum(est, top, out=est)  # no cell holds more than its bound allows
        est += view.log_mass.astype(np.float32)
        est -= shift32
        top += view.log_mass_bound.astype(np.float32)
        top -= shift32
        if unscored is not None:
            est[~unscored[lo:hi]] = -np.inf
            top[~unscored[lo:hi]] = -np.inf
        np.exp(est, out=est)
        b = np.exp(top.astype(np.float64))
        if taken is not None:
            _take_out(view, qc, est, b, taken, lo, hi, inv_t, log_shift[lo:hi])
        bound[lo:hi] = b.sum(axis=1) * np.exp(2.5e-7 * inv_t + 1e-5)
        rest = est.sum(axis=1, dtype=np.float64)
        est_total[lo:hi] = rest
        per_class = _log_model(label_kappa, view.dim, qc @ label_t, inv_t)
        per_class += label_log_mass
        per_class -= shift32
        np.exp(per_class, out=per_class)
        part = mass[lo:hi]
        excess = np.maximum(per_class - part[:, label_cols], 0.0)
        total = excess.sum(axis=1)
        scale = np.where(total > 0, rest / np.maximum(total, 1e-300), 0.0)
        part[:, label_cols] += excess * scale[:, None]
        part += np.where(total > 0, 0.0, rest)[:, None] * prior[None, :]
    return est_total, bound


def _most(view: CellView, q, pivot_cos, inv_t: float) -> np.ndarray:
    """(n, cells) float32: the most a slot of each cell can score, over T (from its pivot and
    reach, with a margin above float32 rounding)."""
    c = q @ view.pivot_t if pivot_cos is None else pivot_cos.astype(np.float32, copy=True)
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


def _take_out(view: CellView, q, est, bound, taken, lo, hi, inv_t, shift) -> None:
    """Estimate again, without the slots a query scored, the cells those slots lie in."""
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
    else:
        log_e = (c * mass - taken_ws) / left_safe * inv_t
    whole_bound = np.exp(view.log_mass_bound[pc])
    scale = np.where(whole_bound > 0, np.maximum(whole_bound - taken_w, 0.0) / np.maximum(whole_bound, 1e-300), 0.0)
    bound[pq, pc] *= scale  # each slot left still scores at most u: its mass is what is left
    model = np.where(keep, np.exp(log_e + np.log(left_safe) - shift[pq]), 0.0)
    est[pq, pc] = np.minimum(model, bound[pq, pc])
