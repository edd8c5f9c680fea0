"""Compiled kernels of the full answer (numba, cached on disk next to this file).

Each fuses what numpy would do in several passes over arrays as large as the scored
slots: exponentials of scores, sums per (query, class), and a top-k selection. The first call in a fresh environment compiles
(a few seconds, measured by ``bench/tail.py``); later processes load the cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


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


@njit(cache=True, parallel=True)
def scan_scored(lims, scores, rows, row_column, row_weight, inv_t, k, class_mass, top_s, top_r, log_shift):
    """For each query: the exact mass per class of every slot it scored, and its top-k.

    Args:
        lims: (n + 1,) query i's scored slots are ``scores[lims[i]:lims[i + 1]]`` (rows alike).
        scores: float32 similarities; rows: int64 table rows.
        row_column: (n_rows,) the probs column of each row's class.
        row_weight: (n_rows,) float64 slot masses (an empty array: every mass is 1).
        inv_t: 1 / T.
        k: top-k width.
        class_mass: (n, C) float64 out (zeroed by the caller): sum of w exp(s / T - log_shift).
        top_s, top_r: (n, k) out: the top-k scores (best first, -inf padding) and rows (-1).
        log_shift: (n,) out: the largest score / T of each query (the unit of class_mass).
    """
    n = len(lims) - 1
    unit = len(row_weight) == 0
    for i in prange(n):
        lo, hi = lims[i], lims[i + 1]
        m = -np.inf
        for j in range(lo, hi):
            if scores[j] > m:
                m = scores[j]
        shift = m * inv_t
        log_shift[i] = shift
        hs = np.empty(k, np.float32)
        hr = np.empty(k, np.int64)
        filled = 0
        for j in range(lo, hi):
            s = scores[j]
            r = rows[j]
            e = np.exp(s * inv_t - shift)
            if not unit:
                e *= row_weight[r]
            class_mass[i, row_column[r]] += e
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
        order = np.argsort(-hs[:filled], kind="mergesort")
        for p in range(filled):
            top_s[i, p] = hs[order[p]]
            top_r[i, p] = hr[order[p]]
        for p in range(filled, k):
            top_s[i, p] = -np.inf
            top_r[i, p] = -1


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
                class_mass[i, c] += weights[j] * np.exp(scores[i, j] * inv_t - shift)
