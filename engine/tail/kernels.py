"""Compiled kernels of the full answer (numba, cached on disk next to this file).

Each fuses what numpy would do in several passes over arrays as large as the scored
slots: exponentials of scores, sums per (query, class) kept sparse, a top-k selection,
and the vMF estimate of (query, class) pairs. The first call in a fresh environment
compiles (a few seconds); later processes load the cache.

numba is the ``fast`` extra. Without it the same functions run as plain Python: the
answers are the same, computed far more slowly (a warning says so once).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

try:
    from numba import njit, prange

    COMPILED = True
except ImportError:  # the 'fast' extra is not installed
    COMPILED = False
    prange = range

    def njit(*args, **_options):
        """No compiler: the function itself (``@njit`` and ``@njit(...)`` alike)."""
        return args[0] if args and callable(args[0]) else (lambda fn: fn)


@njit(cache=True, inline="always")
def _sift_down(hs, hr, n, i):
    """Restore the min-heap property of (hs, hr)[:n] from position i."""
    while True:
        left = 2 * i + 1
        if left >= n:
            return
        small = left
        right = left + 1
        if right < n and hs[right] < hs[left]:
            small = right
        if hs[small] < hs[i]:
            hs[i], hs[small] = hs[small], hs[i]
            hr[i], hr[small] = hr[small], hr[i]
            i = small
        else:
            return


@njit(cache=True)
def _scan_block(first, last, lims, scores, rows, row_column, row_weight, inv_t, k, n_columns,
                out_columns, out_values, out_count, top_s, top_r, log_shift):
    """:func:`scan_scored` for queries first .. last - 1, with one scratch row of C."""
    unit = len(row_weight) == 0
    inv32 = np.float32(inv_t)
    scratch = np.zeros(n_columns)
    seen = np.zeros(n_columns, np.bool_)
    hs = np.empty(k, np.float32)
    hr = np.empty(k, np.int64)
    for i in range(first, last):
        lo, hi = lims[i], lims[i + 1]
        m = -np.inf
        for j in range(lo, hi):
            if scores[j] > m:
                m = scores[j]
        shift = np.float32(m * inv32) if hi > lo else np.float32(0.0)
        log_shift[i] = shift
        filled = 0
        count = 0
        for j in range(lo, hi):
            s = scores[j]
            r = rows[j]
            e = np.float64(math.exp(s * inv32 - shift))  # float32: as exact as the scores
            if not unit:
                e *= row_weight[r]
            c = row_column[r]
            if not seen[c]:
                seen[c] = True
                out_columns[lo + count] = c
                count += 1
            scratch[c] += e
            if filled < k:  # build the heap, then keep the k largest
                hs[filled] = s
                hr[filled] = r
                filled += 1
                if filled == k:
                    for p in range(k // 2 - 1, -1, -1):
                        _sift_down(hs, hr, k, p)
            elif s > hs[0]:
                hs[0] = s
                hr[0] = r
                _sift_down(hs, hr, k, 0)
        for p in range(count):
            c = out_columns[lo + p]
            out_values[lo + p] = scratch[c]
            scratch[c] = 0.0
            seen[c] = False
        out_count[i] = count
        order = np.argsort(-hs[:filled], kind="mergesort")
        for p in range(filled):
            top_s[i, p] = hs[order[p]]
            top_r[i, p] = hr[order[p]]
        for p in range(filled, k):
            top_s[i, p] = -np.inf
            top_r[i, p] = -1


@njit(cache=True, parallel=True)
def scan_scored(lims, scores, rows, row_column, row_weight, inv_t, k, n_columns, blocks,
                out_columns, out_values, out_count, top_s, top_r, log_shift):
    """For each query: the exact mass per class of every slot it scored, and its top-k.

    Args:
        lims: (n + 1,) query i's scored slots are ``scores[lims[i]:lims[i + 1]]`` (rows alike).
        scores: float32 similarities; rows: int64 table rows.
        row_column: (n_rows,) the probs column of each row's class.
        row_weight: (n_rows,) float64 slot masses (an empty array: every mass is 1).
        inv_t: 1 / T.
        k: top-k width.
        n_columns: C.
        blocks: queries are split in this many blocks, one scratch row of C each.
        out_columns, out_values: (lims[n],) out: query i's classes and their masses (summed
            ``w exp(s / T - log_shift)``) at ``lims[i]:lims[i] + out_count[i]``.
        top_s, top_r: (n, k) out: the top-k scores (best first, -inf padding) and rows (-1).
        log_shift: (n,) out: the largest score / T of each query (the unit of the masses).
    """
    n = len(lims) - 1
    for b in prange(blocks):
        _scan_block(b * n // blocks, (b + 1) * n // blocks, lims, scores, rows, row_column, row_weight, inv_t, k,
                    n_columns, out_columns, out_values, out_count, top_s, top_r, log_shift)


@njit(cache=True)
def scan_scored_serial(lims, scores, rows, row_column, row_weight, inv_t, k, n_columns, blocks,
                       out_columns, out_values, out_count, top_s, top_r, log_shift):
    """:func:`scan_scored` on the calling thread (a few queries: waking threads costs more)."""
    _scan_block(0, len(lims) - 1, lims, scores, rows, row_column, row_weight, inv_t, k, n_columns,
                out_columns, out_values, out_count, top_s, top_r, log_shift)


@njit(cache=True, parallel=True)
def add_dense(scores, columns, weights, inv_t, log_shift, class_mass):
    """class_mass[i, columns[j]] += weights[j] exp(scores[i, j] / T - log_shift[i]) for every
    slot j of a chunk (float64 scores; columns -1 for slots to skip)."""
    n, m = scores.shape
    for i in prange(n):
        shift = log_shift[i]
        for j in range(m):
            c = columns[j]
            if c >= 0:
                class_mass[i, c] += weights[j] * math.exp(scores[i, j] * inv_t - shift)


@njit(cache=True, inline="always")
def _log_vmf(c, kap, log_mass, inv_t, nu, first_order):
    """log W + the vMF log moment generating function at q / T for a dot product c (see
    :func:`engine.tail.vmf.log_vmf_mgf`); first order (inner product): log W + c / T."""
    if first_order:
        return log_mass + c * inv_t
    r2_k2 = 2.0 * inv_t * kap * c + inv_t * inv_t
    b = math.sqrt(nu * nu + kap * kap)
    a_b = r2_k2 / (math.sqrt(max(b * b + r2_k2, 0.0)) + b)
    return log_mass + a_b - nu * math.log1p(a_b / (nu + b)) - 0.5 * math.log1p(a_b / b)


@njit(cache=True, inline="always")
def _pair(p, q, pair_query, pair_group, means, kappa, log_mass, inv_t, nu, out):
    i, g = pair_query[p], pair_group[p]
    c = 0.0
    for j in range(q.shape[1]):
        c += q[i, j] * means[g, j]
    first_order = len(kappa) == 0
    out[p] = _log_vmf(c, 0.0 if first_order else kappa[g], log_mass[g], inv_t, nu, first_order)


@njit(cache=True, parallel=True)
def pair_log_mass(q, pair_query, pair_group, means, kappa, log_mass, inv_t, nu, out):
    """log of the estimated attention mass of group ``pair_group[p]`` for query
    ``pair_query[p]``: log W + the vMF log moment generating function at q / T
    (``kappa`` empty: first order, inner product), float64, the dot product fused in.

    Args:
        q: (n, d) float32 queries; means: (groups, d) float64 mean directions (or means).
    """
    for p in prange(len(pair_query)):
        _pair(p, q, pair_query, pair_group, means, kappa, log_mass, inv_t, nu, out)


@njit(cache=True)
def pair_log_mass_serial(q, pair_query, pair_group, means, kappa, log_mass, inv_t, nu, out):
    """:func:`pair_log_mass` on the calling thread."""
    for p in range(len(pair_query)):
        _pair(p, q, pair_query, pair_group, means, kappa, log_mass, inv_t, nu, out)


class _Serial:
    """The kernels of this module as its callers name them, on the calling thread."""

    scan_scored = staticmethod(scan_scored_serial)
    pair_log_mass = staticmethod(pair_log_mass_serial)
    add_dense = staticmethod(add_dense)


SERIAL_QUERIES = 8  # up to this many queries, the kernels run on the calling thread


_warned = []


def pick(n_queries: int):
    """This module's kernels for a batch; their serial twins for a few queries."""
    import sys

    if not COMPILED and not _warned:
        _warned.append(True)
        warnings.warn("numba is not installed: full answers (probs='full') run their kernels as plain Python, "
                      "far more slowly; pip install 'engine[fast]'", RuntimeWarning, stacklevel=3)
    return _Serial if n_queries <= SERIAL_QUERIES else sys.modules[__name__]
