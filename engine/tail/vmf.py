"""The von Mises-Fisher model of a group of unit vectors: its moment generating function
(the attention mass of the group, per unit of mass) in numpy and in torch, and the
concentration fitted to a mean resultant length (Banerjee et al. 2005)."""

from __future__ import annotations

import numpy as np


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


def kappa_from_resultant(r: np.ndarray, dim: int) -> np.ndarray:
    """Concentration of a vMF whose mean resultant length is ``r`` (Banerjee et al. 2005)."""
    r = np.minimum(r, 1 - 1e-12)
    return r * (dim - r * r) / (1 - r * r)


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
