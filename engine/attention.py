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

import numpy as np


@dataclass(frozen=True)
class Attention:
    """Output of :func:`attend`.

    Attributes:
        attention: (n, k) attention weights over the retrieved slots (0 on padding).
        probs: (n, C) class probabilities.
        tail_bound: (n,) upper bound on the attention mass left out by top-k.
    """

    attention: np.ndarray
    probs: np.ndarray
    tail_bound: np.ndarray


def attend(
    scores: np.ndarray,
    weights: np.ndarray,
    class_idx: np.ndarray,
    *,
    n_classes: int,
    temperature: float,
    omitted_weight: np.ndarray,
) -> Attention:
    """Weighted top-k softmax attention with the omitted-mass bound (numpy, float64).

    Args:
        scores: (n, k) similarities of the retrieved slots; padding entries
            (fewer than k slots found) must have ``class_idx == -1``.
        weights: (n, k) slot masses ``w_i > 0``.
        class_idx: (n, k) class index of each slot in ``[0, n_classes)``, -1 for padding.
        n_classes: number of columns of ``probs``.
        temperature: softmax temperature ``T > 0``.
        omitted_weight: (n,) total mass of the slots not retrieved for each query.

    Returns:
        An :class:`Attention` with attention, probs and tail_bound.
    """
    valid = class_idx >= 0
    s = scores.astype(np.float64)
    with np.errstate(divide="ignore"):
        logits = np.where(valid, np.log(weights.astype(np.float64)) + s / temperature, -np.inf)
    log_z = _logsumexp(logits)
    attention = np.exp(logits - log_z[:, None])
    attention[~valid] = 0.0

    # Smallest retrieved similarity bounds every omitted one (exact index).
    s_k = np.where(valid, s, np.inf).min(axis=1)
    omitted = np.maximum(np.asarray(omitted_weight, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_b = np.where(omitted > 0, np.log(omitted) + s_k / temperature, -np.inf)
    log_total = np.logaddexp(log_z, log_b)
    tail_bound = np.where(np.isfinite(log_b), np.exp(log_b - log_total), 0.0)

    n, k = scores.shape
    rows = np.repeat(np.arange(n), k)
    flat = np.where(valid, class_idx, 0).ravel() + rows * n_classes
    probs = np.bincount(flat, weights=attention.ravel(), minlength=n * n_classes)
    return Attention(attention=attention, probs=probs.reshape(n, n_classes), tail_bound=tail_bound)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp that tolerates rows of -inf."""
    m = x.max(axis=1)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(x - m_safe[:, None]).sum(axis=1)) + m_safe


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
