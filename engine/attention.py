"""The attention kernel of Matching Networks over retrieved slots.

Vinyals et al. (2016), "Matching Networks for One Shot Learning", eq. (1)-(2):
``y = sum_i a(x, x_i) y_i`` with ``a`` a softmax over cosine similarity. engine
adds a temperature ``T`` and a slot mass ``w_i`` (ARCHITECTURE.md):

    a_i  = w_i exp(s_i / T) / Z,   Z = sum over the slots used of w_i exp(s_i / T)
    p(c) = sum of a_i over the slots labelled c

Only the top-k retrieved slots take part. With an exact index every omitted slot
has ``s <= s_k`` (the smallest retrieved similarity), so the omitted mass is at
most ``B = W_omitted exp(s_k / T)`` and the fraction of attention left out, which
also bounds the total-variation error of ``p``, is at most ``B / (Z_k + B)``.

Everything is computed in log space so that small temperatures never overflow.
Two paths: numpy (float64) for serving, torch (autograd) for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass
class Attention:
    """Output of :func:`attend`.

    Attributes:
        attention: (n, k) attention weights over the retrieved slots (0 on padding).
        tail_bound: (n,) upper bound on the attention mass left out by top-k.
        class_idx: (n, k) class index of each slot, -1 for padding.
        n_classes: number of classes C.
    """

    attention: np.ndarray
    tail_bound: np.ndarray
    class_idx: np.ndarray
    n_classes: int

    @cached_property
    def probs(self) -> np.ndarray:
        """(n, C) class probabilities."""
        return class_probs(self.attention, self.class_idx, self.n_classes)


def attend(
    scores: np.ndarray,
    weights: np.ndarray | None,
    class_idx: np.ndarray,
    *,
    n_classes: int,
    temperature: float,
    omitted_weight: np.ndarray | float | None = None,
    padded: bool | None = None,
    omitted_log_mass: np.ndarray | None = None,
) -> Attention:
    """Weighted top-k softmax attention with the omitted-mass bound (numpy, float64).

    Args:
        scores: (n, k) similarities of the retrieved slots; padding entries
            (fewer than k slots found) must have ``class_idx == -1``.
        weights: (n, k) slot masses ``w_i > 0``, or None when every mass is 1.
        class_idx: (n, k) class index of each slot in ``[0, n_classes)``, -1 for padding.
        n_classes: number of classes C.
        temperature: softmax temperature ``T > 0``.
        omitted_weight: (n,) total mass of the slots not retrieved for each query; their
            attention mass is then bounded by ``omitted_weight exp(s_k / T)``.
        padded: whether any ``class_idx`` is -1 (None: look).
        omitted_log_mass: instead of ``omitted_weight``, the log of a bound already known on
            the unnormalised mass ``sum w_i exp(s_i / T)`` of the slots left out (-inf: none),
            as a merge of several memories' answers has it.

    Returns:
        An :class:`Attention`; its dense ``probs`` are computed when first read.
    """
    if padded is None:
        padded = bool(class_idx.min() < 0)
    logits = np.divide(scores, temperature, dtype=np.float64)
    if padded:
        logits[class_idx < 0] = -np.inf
    # Smallest retrieved similarity bounds every omitted one (exact index): the omitted
    # mass is at most B = W_omitted exp(s_k / T); s_k / T is read before the masses join.
    low = (np.where(class_idx >= 0, logits, np.inf) if padded else logits).min(axis=1)
    if weights is not None:
        logits += np.log(weights.astype(np.float64, copy=False))
    m = logits.max(axis=1, keepdims=True)
    if padded:  # a row may have retrieved nothing (an IVF probe of dead lists)
        m[~np.isfinite(m)] = 0.0
    logits -= m
    attention = np.exp(logits, out=logits)
    z = attention.sum(axis=1)
    if padded:
        z = np.maximum(z, np.finfo(np.float64).tiny)
    attention /= z[:, None]
    # B and Z both scaled by exp(-m)
    if omitted_log_mass is not None:
        b = np.exp(np.asarray(omitted_log_mass, dtype=np.float64) - m[:, 0])
    else:
        b = np.asarray(omitted_weight, dtype=np.float64) * np.exp(low - m[:, 0])
    with np.errstate(invalid="ignore"):  # no bound (b inf or NaN) leaves everything in doubt: 1
        tail_bound = np.where(np.isfinite(b), np.where(b > 0, b / (z + b), 0.0), 1.0)
    return Attention(attention=attention, tail_bound=tail_bound, class_idx=class_idx, n_classes=n_classes)


def class_probs(attention: np.ndarray, class_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, C) dense class probabilities: attention summed per class (-1 entries ignored)."""
    n, k = attention.shape
    flat = (np.maximum(class_idx, 0) + np.arange(n)[:, None] * n_classes).ravel()
    mass = attention.ravel()  # 0 on padding
    return np.bincount(flat, weights=mass, minlength=n * n_classes).reshape(n, n_classes)


def top_class(attention: np.ndarray, class_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """(n,) the class of most attention in each row, ties to the lowest index.

    Sums per class densely when C is within a small multiple of k (and (n, C) fits in a
    few MB): one bincount is faster than sorting there. Otherwise sorts each row's k slots
    by class and sums the runs, O(n k log k) whatever C is.
    """
    n, k = attention.shape
    if n == 1:  # one query: sum over the classes its k slots hold
        return np.array([np.argmax(np.bincount(np.maximum(class_idx[0], 0), weights=attention[0]))])
    if n * n_classes <= (1 << 16) or (n_classes <= 16 * k and n * n_classes <= (1 << 22)):
        return np.argmax(class_probs(attention, class_idx, n_classes), axis=1)
    row = np.arange(n)[:, None]
    order = np.argsort(class_idx, axis=1)  # the order within a class's run does not matter
    cls = class_idx[row, order]
    att = np.where(cls >= 0, attention[row, order], -1.0)  # padding never wins
    run = np.ones((n, k), bool)
    run[:, 1:] = cls[:, 1:] != cls[:, :-1]
    run_id = np.cumsum(run, axis=1) - 1 + row * k
    mass = np.bincount(run_id.ravel(), weights=att.ravel(), minlength=n * k).reshape(n, k)
    best = np.argmax(mass, axis=1) + row[:, 0] * k
    first = np.argmax(run_id == best[:, None], axis=1)
    return cls[row[:, 0], first]


def attend_torch(scores, weights, class_idx, *, n_classes: int, temperature):
    """Log class probabilities of the weighted softmax attention, with autograd.

    The training path: gradients flow through ``scores`` (and so through the
    embeddings that produced them), ``weights`` and a tensor ``temperature``.
    Log-probabilities are computed by log-sum-exp per class, never as the log of
    summed probabilities, so the NLL loss stays finite for confident models.

    Args:
        scores: (n, k) float tensor of similarities.
        weights: (n, k) or (k,) tensor of slot masses ``w_i > 0``.
        class_idx: (n, k) or (k,) long tensor of class indices, -1 for padding.
        n_classes: number of classes C.
        temperature: float or 0-d tensor ``T > 0``.

    Returns:
        (n, C) tensor of log p(c); -inf for a class with no retrieved slot.
    """
    import torch

    class_idx = torch.as_tensor(class_idx, device=scores.device).expand_as(scores)
    weights = torch.as_tensor(weights, dtype=scores.dtype, device=scores.device).expand_as(scores)
    valid = class_idx >= 0
    logits = torch.where(valid, torch.log(weights) + scores / temperature, torch.full_like(scores, -torch.inf))
    log_z = torch.logsumexp(logits, dim=1, keepdim=True)
    onehot = torch.nn.functional.one_hot(class_idx.clamp_min(0), n_classes).to(torch.bool) & valid[..., None]
    per_class = torch.where(onehot, logits[..., None], torch.full_like(onehot, -torch.inf, dtype=scores.dtype))
    return torch.logsumexp(per_class, dim=1) - log_z
