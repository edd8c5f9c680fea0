"""Exact references the tests compare against: plain float64 numpy, no FAISS, no top-k."""

from __future__ import annotations

import numpy as np


def dense_reference(memory_vectors, memory_labels, memory_weights, queries, classes, temperature, metric="cosine"):
    """Exact full attention over every slot, in float64 (Matching Networks eq. 1 with masses).

    Independent of engine's code: plain numpy over all slots, no FAISS, no top-k.
    Returns (attention (n, N), probs (n, C)) with columns of probs in ``classes`` order.
    """
    z = np.asarray(memory_vectors, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    if metric == "cosine":
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "l2":  # negative squared distances, each computed as a difference (no expansion)
        sim = -np.stack([((z - row) ** 2).sum(axis=1) for row in q]) if len(q) else np.zeros((0, len(z)))
    else:
        sim = q @ z.T
    logits = sim / temperature + np.log(np.asarray(memory_weights, dtype=np.float64))[None, :]
    logits -= logits.max(axis=1, keepdims=True)
    a = np.exp(logits)
    a /= a.sum(axis=1, keepdims=True)
    labels = np.asarray(memory_labels)
    probs = np.stack([a[:, labels == c].sum(axis=1) for c in classes], axis=1)
    return a, probs


def brute_force_topk(memory_vectors, queries, k, metric="cosine"):
    """Exact top-k rows by similarity (for l2, negative squared distance), float64 numpy."""
    z = np.asarray(memory_vectors, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    if metric == "cosine":
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = -np.stack([((z - row) ** 2).sum(axis=1) for row in q]) if metric == "l2" else q @ z.T
    top = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, top, 1), top
