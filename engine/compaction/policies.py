"""Compaction policies: shrink a memory to a slot budget while preserving attention mass.

A slot's weight ``w_i`` is its mass in the attention kernel (``a_i ∝ w_i exp(s_i/T)``).
Every policy keeps every class that was present and keeps each class's total
weight, so the attention mass a class can receive is preserved:

- ``merge``: per-class spherical k-means (``faiss.Kmeans``, weighted). Each centroid
  becomes a slot whose vector is the weighted mean of its members (re-normalised
  for cosine) and whose weight is the sum of theirs. With one slot per class this
  is a Prototypical-Network-like memory; with no compaction, Matching Networks'.
- ``reservoir``: weighted sampling without replacement within each class; the kept
  weights are rescaled to the class's mass.
- ``age``: evict the slots least recently retrieved (or, never retrieved, the
  oldest), as in "Learning to Remember Rare Events" (Kaiser et al., 2017); every
  class keeps its freshest slot; kept weights are rescaled to the class's mass.
- ``distill``: start from ``merge``, then optimise the slot vectors (and, with
  ``learn_weights``, the split of each class's mass among its slots) with torch so
  that the compact memory's class probabilities match the full memory's (KL) on
  queries sampled from the slots themselves. Both memories answer by attention
  over the top-k slots, as a query gets it, and leave the query's own slot out;
  the state kept is the best on held-out queries, the merge included.

Class budgets are allocated in proportion to class mass, with at least one slot
per class (largest-remainder rounding).
"""

from __future__ import annotations

import faiss
import numpy as np

from ..errors import InvalidValueError
from ..options import POLICIES
from .budget import allocate
from .distill import check_options, distill
from .slotset import SlotSet, progress


def by_class(label_idx: np.ndarray):
    order = np.argsort(label_idx, kind="stable")
    classes, starts = np.unique(label_idx[order], return_index=True)
    return classes, np.split(order, starts[1:])


def compact(vectors, weights, label_idx, used, *, budget: int, policy: str = "merge",
            metric: str = "cosine", temperature: float = 0.1, seed: int = 0, **options) -> SlotSet:
    """Shrink the live slots to at most ``budget`` with ``policy``.

    Args:
        vectors, weights, label_idx: columns of the live slots.
        used: when each was last written or retrieved ("age" keeps the most recent); None
            if the memory does not track usage.
        budget: the most slots to keep (at least the number of classes).
        policy: one of POLICIES.
        metric: "cosine" (vectors are unit-norm and merged vectors re-normalised), "ip" or "l2"
            (the similarity distill matches attention with; vectors as callers wrote them).
        temperature: the memory's temperature (distill matches its attention).
        seed: seed for k-means, sampling and distillation.
        **options: distill's ``steps``, ``lr``, ``queries``, ``learn_weights``, ``k``, ``holdout``,
            ``eval_every``.

    Raises:
        ValueError: an unknown policy or option, an option out of range, or a budget below
            the number of classes.
    """
    if policy not in POLICIES:
        raise InvalidValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    check_options(options)
    classes, members = by_class(label_idx)
    mass = np.array([weights[m].sum() for m in members])
    alloc = allocate(mass, np.array([len(m) for m in members]), budget)
    rng = np.random.default_rng(seed)
    if policy == "merge" or policy == "distill":
        out, owner, means = merge(vectors, weights, classes, members, alloc, metric == "cosine", seed)
        if policy == "distill":
            out = distill(out, owner, means, vectors, weights, label_idx, metric, temperature, seed, **options)
        return out
    if policy == "reservoir":
        keep = [rng.choice(m, size=b, replace=False, p=weights[m] / weights[m].sum()) if b < len(m) else m
                for m, b in zip(members, alloc)]
    else:  # age
        if used is None:
            raise InvalidValueError("the age policy needs usage times: this memory was made with track_usage=False")
        recency = used
        freshest = np.array([m[np.argmax(recency[m])] for m in members])
        rest = np.setdiff1d(np.arange(len(weights)), freshest)
        extra = rest[np.argsort(-recency[rest], kind="stable")[: max(0, budget - len(freshest))]]
        kept = np.concatenate([freshest, extra])
        keep = [np.intersect1d(m, kept) for m in members]
    return _rescaled(vectors, weights, label_idx, keep)


def _rescaled(vectors, weights, label_idx, keep: list[np.ndarray]) -> SlotSet:
    """Kept rows, their weights scaled so each class keeps its mass."""
    rows, w = [], []
    for m_keep, cls_rows in zip(keep, by_class(label_idx)[1]):
        scale = weights[cls_rows].sum() / weights[m_keep].sum()
        rows.append(m_keep)
        w.append(weights[m_keep] * scale)
    rows = np.concatenate(rows)
    return SlotSet(vectors[rows], np.concatenate(w), label_idx[rows], rows)


def merge(vectors, weights, classes, members, alloc, cosine: bool, seed: int):
    """Merged slots, plus for distill: ``owner[i]``, the merged slot input row i went into, and the
    un-normalised weighted mean of every merged slot."""
    out_v, out_w, out_c, out_src, out_mean = [], [], [], [], []
    owner = np.empty(len(vectors), np.int64)
    n_out = 0
    with progress(len(classes), "merge", "class") as bar:
        for c, m, b in zip(classes, members, alloc):
            n_out = _merge_class(vectors, weights, c, m, b, cosine, seed, owner, n_out,
                                 (out_v, out_w, out_c, out_src, out_mean))
            bar.update()
    merged = SlotSet(np.concatenate(out_v), np.concatenate(out_w), np.concatenate(out_c).astype(np.int32),
                     np.concatenate(out_src))
    return merged, owner, np.concatenate(out_mean)


def _merge_class(vectors, weights, c, m, b, cosine: bool, seed: int, owner, n_out: int, out) -> int:
    """Merge class ``c``'s rows ``m`` into at most ``b`` slots, appended to ``out``; returns
    the slots made so far."""
    out_v, out_w, out_c, out_src, out_mean = out
    if b >= len(m):  # nothing to merge: keep the slots as they are
        owner[m] = n_out + np.arange(len(m))
        out_v.append(vectors[m]); out_w.append(weights[m]); out_c.append(np.full(len(m), c)); out_src.append(m)  # noqa: E702
        out_mean.append(vectors[m].astype(np.float64))
        return n_out + len(m)
    x, w = vectors[m], weights[m]
    if b == 1:
        assign = np.zeros(len(m), np.int64)
    elif 2 * b >= len(m):  # a light squeeze: merge nearest pairs rather than k-means with k close to n
        assign = _pair_assign(x, b, cosine)
    else:
        km = faiss.Kmeans(x.shape[1], int(b), niter=20, seed=seed, spherical=cosine, verbose=False)
        km.cp.min_points_per_centroid = 1  # small classes: no warning, the result is still a partition
        km.train(x, weights=w.astype(np.float32))
        _, assign = km.index.search(x, 1)
        assign = assign[:, 0]
    sums = np.zeros((b, x.shape[1]))
    np.add.at(sums, assign, x * w[:, None])
    mass = np.bincount(assign, weights=w, minlength=b)
    used = mass > 0  # an empty cluster had no members and so no mass
    renumber = np.cumsum(used) - 1
    owner[m] = n_out + renumber[assign]
    means = sums[used] / mass[used, None]
    centroids = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12) if cosine else means
    out_v.append(centroids.astype(np.float32)); out_w.append(mass[used]); out_c.append(np.full(used.sum(), c))  # noqa: E702
    out_src.append(np.full(used.sum(), -1))
    out_mean.append(means)
    return n_out + int(used.sum())


def _pair_assign(x: np.ndarray, b: int, cosine: bool) -> np.ndarray:
    """Cluster ids putting ``len(x)`` points into ``b`` groups by merging nearest pairs, round by round.

    Each round finds every point's nearest neighbour (FAISS, exact), takes disjoint
    pairs most similar first, and merges as many as are still needed; merged groups
    are represented by their mean in the next round.
    """
    group = np.arange(len(x))
    reps, members = x.astype(np.float32), [[i] for i in range(len(x))]
    while len(members) > b:
        index = faiss.IndexFlatIP(x.shape[1]) if cosine else faiss.IndexFlatL2(x.shape[1])
        index.add(reps)
        dist, nn = index.search(reps, 2)
        near = np.where(nn[:, 0] == np.arange(len(reps)), nn[:, 1], nn[:, 0])
        score = dist[np.arange(len(reps)), np.where(nn[:, 0] == np.arange(len(reps)), 1, 0)]
        order = np.argsort(-score if cosine else score, kind="stable")
        taken = np.zeros(len(reps), bool)
        need = len(members) - b
        merged = []
        for i in order:
            j = near[i]
            if need == 0:
                break
            if taken[i] or taken[j] or i == j:
                continue
            taken[i] = taken[j] = True
            merged.append((i, j))
            need -= 1
        new_members = [members[i] + members[j] for i, j in merged] + [members[i] for i in np.flatnonzero(~taken)]
        members = new_members
        reps = np.stack([x[g].mean(axis=0) for g in members]).astype(np.float32)
        if cosine:
            reps /= np.maximum(np.linalg.norm(reps, axis=1, keepdims=True), 1e-12)
    for cluster, g in enumerate(members):
        group[g] = cluster
    return group
