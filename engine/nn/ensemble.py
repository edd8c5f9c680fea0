"""An ensemble of trained Matching Networks that averages their attention scores.

Each member scores a query against a support image by ``cos(h(x), g(x_i)) / T_m``. The
ensemble scores by the mean of those logits, which is itself a Matching Network: a
backbone that concatenates each member's embedding (views included, as the member sees
them), L2-normalised and scaled by ``sqrt(w_m)`` with ``w_m`` proportional to
``1 / T_m``, has unit norm, so the cosine of two concatenations is ``sum_m w_m cos_m``;
at the temperature ``M / sum_m (1 / T_m)`` (the harmonic mean) that is the mean of the
members' logits exactly. Everything a model does (episodes, ``to_memory``,
``query_memory``, ``eval_oneshot``) works on the ensemble unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidValueError
from .matching import MatchingNetwork


class _Concatenated(nn.Module):
    """The members' embeddings, each normalised and weighted, side by side."""

    def __init__(self, members: list[MatchingNetwork], weights: torch.Tensor):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("scale", weights.sqrt())
        self.out_dim = sum(m.dim for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [F.normalize(m.backbone_features(x)[0], dim=1) * s  # each member through its own views
                 for m, s in zip(self.members, self.scale)]
        return torch.cat(parts, dim=1)


def ensemble(models: list[MatchingNetwork]) -> MatchingNetwork:
    """A Matching Network whose logits are the mean of ``models``' (each through its own
    test-time views). For evaluation: the members are frozen and in eval mode.

    Raises:
        InvalidValueError: no models, or a member with Full Context Embeddings (its LSTMs read the
            whole support set in its own space) or with separate g and h backbones, or
            members trained on images of different sizes.
    """
    if not models:
        raise InvalidValueError("an ensemble needs at least one model")
    sides = {m.image_size for m in models} - {None}  # None: a model that does not say (any size)
    if len(sides) > 1:
        raise InvalidValueError(f"an ensemble's members must read one image size, got {sorted(sides)}")
    for m in models:
        if m.support_lstm is not None or m.h_backbone is not m.g_backbone:
            raise InvalidValueError("an ensemble takes models without FCE and with one shared backbone")
        m.eval()
        m.requires_grad_(False)
    inv_t = torch.stack([1.0 / m.temperature.detach() for m in models])
    net = MatchingNetwork(_Concatenated(list(models), inv_t / inv_t.sum()),
                          temperature=float(len(models) / inv_t.sum()), learn_temperature=False,
                          image_size=sides.pop() if sides else None)
    net.eval()
    return net
