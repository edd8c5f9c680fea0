"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra, 2016,
"Matching Networks for One Shot Learning", NeurIPS).

    P(y | x, S) = sum_i a(x, x_i) y_i,   a(x, x_i) = softmax_i(cos(f(x), g(x_i)) / T)   (eq. 1-2)

with g embedding the support set and f (here ``h``, as in the project's docs)
embedding queries; with Full Context Embeddings both see the whole support set
(:mod:`engine.nn.fce`). The temperature ``T`` is learned (the paper's kernel has
none; a learned scale is what makes cosine attention sharp enough to train).
The output is log-probabilities; train with NLL on them, never on probabilities.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attend_torch
from ..data.augment import apply_view, check_views, view_maps
from ..data.omniglot import SMALLEST_SIZE
from ..errors import InvalidValueError, UsageError
from ..index import VectorIndex
from .backbone import ConvEmbedding, check_width
from .fce import AttentionLSTM, SupportBiLSTM

# images per backbone call out of training: at 28x28 and 64 filters a block's activations
# are about 26 MB (52 MB at 40x40 or 128 filters); engine.runtime.prepare has them reused
# from the heap rather than faulted in again each batch
INFERENCE_BATCH = 128


class MatchingNetwork(nn.Module):
    """A Matching Network: ``process_support_set(x, y)``, then ``forward(query)`` -> log p(c | query).

    Args:
        backbone: the embedding g' (and f' when shared); default the paper's 4-block conv net.
        shared: use one backbone for g' and f' (True) or two copies.
        fce: Full Context Embeddings (bidirectional LSTM g, attention LSTM f).
        fce_steps: K, the attention LSTM's read steps.
        temperature: initial softmax temperature T.
        learn_temperature: learn T (as log T) with the rest.
        in_channels: image channels of the default backbone.
        width: filters per block of the default backbone, or a list of 4, one a block (the
            last block's is the embedding's dimension with ``pool="mean"``; times the last
            map's positions with ``"flat"``).
        views: test-time views: out of training, each image is embedded as the mean of the
            backbone's outputs on itself and ``views - 1`` slightly moved copies (the same
            fixed maps for support and query images alike, :func:`engine.data.augment.view_maps`).
            Training always sees single images. Settable later (``model.views = 8``).
        image_size: the square side of the images the model was trained on (kept in its
            checkpoint): images of another size are refused, and loaders read images at it
            (``load_oneshot_runs(path, size=model.image_size)``). None: any size.
        pool: how the default backbone makes one vector of its last map
            (:class:`~engine.nn.backbone.ConvEmbedding`): ``"mean"`` or ``"flat"`` (needs
            ``image_size``).
    """

    def __init__(self, backbone: nn.Module | None = None, *, shared: bool = True, fce: bool = False,
                 fce_steps: int = 5, temperature: float = 0.1, learn_temperature: bool = True,
                 in_channels: int = 1, width: int | list[int] = 64, views: int = 1, image_size: int | None = None,
                 pool: str = "mean"):
        super().__init__()
        side = None if image_size is None else _check_side(image_size)
        width = check_width(width)
        self.g_backbone = backbone if backbone is not None else ConvEmbedding(in_channels, width, pool=pool,
                                                                              image_size=side)
        self.h_backbone = self.g_backbone if shared else copy.deepcopy(self.g_backbone)
        self.dim = int(getattr(self.g_backbone, "out_dim", 64))
        self.support_lstm = SupportBiLSTM(self.dim) if fce else None
        self.query_lstm = AttentionLSTM(self.dim, fce_steps) if fce else None
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self.options = {"shared": shared, "fce": fce, "fce_steps": fce_steps, "temperature": temperature,
                        "learn_temperature": learn_temperature, "in_channels": in_channels, "width": width,
                        "views": 1, "image_size": side, "pool": pool}
        self.views = views
        self._support: torch.Tensor | None = None
        self._support_idx: torch.Tensor | None = None
        self.classes: torch.Tensor | None = None

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @property
    def image_size(self) -> int | None:
        return self.options["image_size"]

    @property
    def views(self) -> int:
        return self.options["views"]

    @views.setter
    def views(self, count: int) -> None:
        self.options["views"] = check_views(count)

    def _backbone(self, net: nn.Module, x: torch.Tensor, batch_size: int | None) -> torch.Tensor:
        """The backbone's embeddings of x: one pass while training or with one view, else the
        mean over the views (each view made only when it is embedded)."""
        side = self.options["image_size"]
        if side is not None and tuple(x.shape[-2:]) != (side, side):
            raise InvalidValueError(f"this model embeds {side}x{side} images, got {tuple(x.shape[-2:])}: read them "
                                    f"at the model's image_size")
        if self.training or self.views == 1:
            return _chunked(net, x, batch_size)
        images = x.unsqueeze(1) if x.dim() == 3 else x
        maps = view_maps(self.views, size=tuple(images.shape[-2:]))

        def viewed(chunk: torch.Tensor) -> torch.Tensor:  # a chunk's views, made as they are embedded
            return torch.stack([net(apply_view(chunk, theta) if v else chunk) for v, theta in enumerate(maps)]).mean(0)

        return _chunked(viewed, images, batch_size)

    # -- embeddings --------------------------------------------------------------------
    def embed_support(self, x: torch.Tensor, batch_size: int | None = None, *, features: bool = False) -> torch.Tensor:
        """g(x_i, S): (m, ...) support images -> (m, d) embeddings (full context with FCE).

        ``batch_size`` runs the backbone in chunks (for large supports at inference).
        ``features``: x are already g'(x_i), the backbone's outputs (:meth:`backbone_features`).
        """
        g = x if features else self._backbone(self.g_backbone, x, batch_size)
        return self.support_lstm(g) if self.support_lstm is not None else g

    def embed_queries(self, x: torch.Tensor, support: torch.Tensor | None = None, reader=None,
                      batch_size: int | None = None, *, features: bool = False) -> torch.Tensor:
        """h(x, S): (n, ...) query images -> (n, d); with FCE, K read steps over ``support`` (or ``reader``).
        ``features``: x are already f'(x), the backbone's outputs."""
        h = x if features else self._backbone(self.h_backbone, x, batch_size)
        if self.query_lstm is not None:
            if support is None and reader is None:
                raise InvalidValueError("FCE queries need the support embeddings: call process_support_set first")
            h = self.query_lstm(h, support, reader=reader)
        return h

    @torch.no_grad()
    def backbone_features(self, x: torch.Tensor, batch_size: int = INFERENCE_BATCH
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(g'(x), f'(x)): the per-image part of the embeddings (test-time views included), out of
        training. Episodes that reuse images can embed them once and pass these with
        ``features=True``; only FCE's LSTMs, which see the whole support set, run per episode."""
        was = self.training
        self.eval()
        g = self._backbone(self.g_backbone, x, batch_size)
        h = g if self.h_backbone is self.g_backbone else self._backbone(self.h_backbone, x, batch_size)
        self.train(was)
        return g, h

    # -- the easyfsl-style contract -------------------------------------------------------
    def process_support_set(self, x: torch.Tensor, y: torch.Tensor, *, features: bool = False) -> None:
        """Embed and keep a support set.

        Args:
            x: (m, ...) support images (or, with ``features``, their g' outputs).
            y: (m,) integer labels; the output's columns are ``self.classes`` (sorted).
        """
        y = torch.as_tensor(y)
        self._support = self.embed_support(x, features=features)
        self.classes, self._support_idx = torch.unique(y, sorted=True, return_inverse=True)

    def forward(self, query: torch.Tensor, *, features: bool = False) -> torch.Tensor:
        """(n, C) log-probabilities over ``self.classes`` by attention over the whole support set
        (``features``: the queries are already f' outputs)."""
        self._require_support()
        h = self.embed_queries(query, self._support, features=features)
        scores = F.normalize(h, dim=1) @ F.normalize(self._support, dim=1).T
        return attend_torch(scores, torch.ones_like(scores), self._support_idx.expand_as(scores),
                            n_classes=len(self.classes), temperature=self.temperature)

    def forward_topk(self, query: torch.Tensor, k: int, *, estimate_tail: bool = False) -> torch.Tensor:
        """Log-probabilities from attention over each query's top-k support slots only.

        For supports too large for one softmax: FAISS retrieves the top-k slots
        (no gradient), then their similarities are recomputed in torch, so
        gradients flow through both the query and the retrieved support
        embeddings. With k = the support size this equals :meth:`forward`.
        With ``estimate_tail``, the slots not retrieved join as an estimated mass
        per class (:func:`engine.tail.class_tail_torch`, what ``Memory(probs="full")``
        adds), so the answer approximates :meth:`forward` rather than top-k alone.
        """
        self._require_support()
        h = F.normalize(self.embed_queries(query, self._support), dim=1)
        g = F.normalize(self._support, dim=1)
        k = min(int(k), len(g))
        index = VectorIndex(g.shape[1], "Flat").build(np.ascontiguousarray(g.detach().cpu().numpy(), dtype=np.float32))
        _, top = index.search(np.ascontiguousarray(h.detach().cpu().numpy(), dtype=np.float32), k)
        top = torch.as_tensor(top, device=h.device)
        scores = torch.einsum("nd,nkd->nk", h, g[top])
        if estimate_tail and k < len(g):
            return self._with_tail(h, g, top, scores)
        return attend_torch(scores, torch.ones_like(scores), self._support_idx[top],
                            n_classes=len(self.classes), temperature=self.temperature)

    def _with_tail(self, h, g, top, scores) -> torch.Tensor:
        """log p(c) over the top-k slots plus the estimated rest of each class."""
        from ..tail import class_tail_torch

        n_classes = len(self.classes)
        logits = scores / self.temperature
        cls = self._support_idx[top]
        per_class = torch.full((len(h), n_classes), -torch.inf, dtype=logits.dtype, device=logits.device)
        onehot = torch.nn.functional.one_hot(cls, n_classes).to(torch.bool)
        per_class = torch.logsumexp(torch.where(onehot, logits[..., None], per_class[:, None, :]), dim=1)
        rest = class_tail_torch(h, g, self._support_idx, top, scores, n_classes, self.temperature)
        joined = torch.logaddexp(per_class, rest)
        return joined - torch.logsumexp(joined, dim=1, keepdim=True)

    def _require_support(self) -> None:
        if self._support is None:
            raise UsageError("call process_support_set(x, y) before forward")

    # -- memory-backed inference -------------------------------------------------------
    @torch.no_grad()
    def to_memory(self, x: torch.Tensor, y, *, batch_size: int = INFERENCE_BATCH, **memory_options):
        """Embed a support set with g and write it into an :class:`engine.Memory`.

        The memory stores g(x_i, S) (full-context when FCE is on), cosine metric,
        with this model's temperature unless ``temperature=`` is given.

        Args:
            x: (m, ...) support images.
            y: m labels (ints or strings).
            batch_size: images per backbone call.
            **memory_options: passed to ``Memory`` (index, path, ...).

        Returns:
            The memory.
        """
        from ..memory import Memory

        was = self.training
        self.eval()
        g = self.embed_support(torch.as_tensor(x), batch_size).cpu().numpy()
        self.train(was)
        memory_options.setdefault("temperature", float(self.temperature))
        memory_options.setdefault("index", "Flat")
        memory = Memory(self.dim, metric="cosine", **memory_options)
        memory.add(g, np.asarray(y).tolist() if not isinstance(y, list) else y)
        return memory

    @torch.no_grad()
    def query_memory(self, memory, x: torch.Tensor, *, k: int = 64, batch_size: int = INFERENCE_BATCH,
                     **query_options):
        """Embed queries with h and answer them by ``memory.query``.

        With FCE, h's attention LSTM reads the memory through top-k retrieval:
        each read step retrieves the k slots most similar to the current state
        and attends over their stored (unit-norm) vectors. With k at least the
        memory's size this is the in-batch FCE exactly.

        Returns:
            A :class:`engine.QueryResult`.
        """
        was = self.training
        self.eval()
        reader = None
        if self.query_lstm is not None:
            def reader(h: torch.Tensor) -> torch.Tensor:
                res = memory.query(h.cpu().numpy(), k=k, probs="top-k")  # the read needs ids, not a tail
                v = torch.as_tensor(memory.get(np.where(res.ids >= 0, res.ids, res.ids[:, :1]).ravel()).vectors)
                v = v.reshape(len(h), -1, self.dim).to(h)
                a = torch.softmax(
                    torch.einsum("nd,nkd->nk", h, v).masked_fill(torch.as_tensor(res.ids < 0), -torch.inf), 1)
                return torch.einsum("nk,nkd->nd", a, v)
        h = self.embed_queries(torch.as_tensor(x), reader=reader, batch_size=batch_size)
        self.train(was)
        return memory.query(h.cpu().numpy(), k=k, **query_options)

    # -- checkpoints -------------------------------------------------------------------
    def config(self) -> dict:
        """The constructor options, for a JSON checkpoint config (default backbone only)."""
        return copy.deepcopy(self.options)  # a caller's edits (a width list's) never reach the model

    @classmethod
    def from_config(cls, config: dict) -> MatchingNetwork:
        return cls(**{k: config[k] for k in ("shared", "fce", "fce_steps", "temperature", "learn_temperature",
                                             "in_channels", "width", "views", "image_size", "pool") if k in config})


def _check_side(side) -> int:
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < SMALLEST_SIZE:
        raise InvalidValueError(f"image_size must be an integer >= {SMALLEST_SIZE} (the default backbone's four "
                                f"poolings) or None, got {side!r}")
    return int(side)


def _chunked(net, x: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    if batch_size is None or len(x) <= batch_size:
        return net(x)
    return torch.cat([net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
