"""N-way K-shot episodes, as in Vinyals et al. (2016): a support set of N classes
with K examples each, and queries from the same classes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidValueError
from .images import pixels


@dataclass
class Episode:
    """Images are (n, 28, 28) float32 in [0, 1]; labels are episode-local, 0..N-1."""

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray


class EpisodeSampler:
    """Draw episodes from a set of classes with several examples each.

    Args:
        images: (n_classes, n_examples, H, W) uint8.
        n_way: classes per episode.
        k_shot: support examples per class.
        n_query: query examples per class.
        groups: optional group of each class (an Omniglot alphabet); with
            ``within_group`` all classes of an episode come from one group.
        within_group: probability that an episode is drawn within one group.
        seed: seed of the sampler's generator.
    """

    def __init__(self, images: np.ndarray, n_way: int, k_shot: int, n_query: int, *, groups=None,
                 within_group: float = 0.0, seed: int = 0):
        n_classes, n_examples = images.shape[:2]
        if n_way > n_classes:
            raise InvalidValueError(f"{n_way}-way episodes need {n_way} classes; there are {n_classes}")
        if k_shot + n_query > n_examples:
            raise InvalidValueError(f"{k_shot}-shot with {n_query} queries needs {k_shot + n_query} examples per "
                                    f"class; there are {n_examples}")
        self.images, self.n_way, self.k_shot, self.n_query = images, n_way, k_shot, n_query
        self.within_group = within_group
        self.rng = np.random.default_rng(seed)
        self._groups = []
        if groups is not None:
            by_group: dict = {}
            for i, g in enumerate(groups):
                by_group.setdefault(g, []).append(i)
            self._groups = [np.array(v) for v in by_group.values() if len(v) >= n_way]
        if within_group > 0 and not self._groups:
            raise InvalidValueError(f"within-group episodes need a group with at least {n_way} classes")

    def sample(self) -> Episode:
        """One episode."""
        if self._groups and self.rng.random() < self.within_group:
            sizes = np.array([len(g) for g in self._groups], dtype=float)
            pool = self._groups[self.rng.choice(len(self._groups), p=sizes / sizes.sum())]
            classes = self.rng.choice(pool, self.n_way, replace=False)
        else:
            classes = self.rng.choice(len(self.images), self.n_way, replace=False)
        n_examples = self.images.shape[1]
        picks = np.stack([self.rng.choice(n_examples, self.k_shot + self.n_query, replace=False) for _ in classes])
        chosen = pixels(self.images[classes[:, None], picks])  # (N, K+Q, H, W)
        labels = np.repeat(np.arange(self.n_way), self.k_shot + self.n_query).reshape(self.n_way, -1)
        s, q = slice(0, self.k_shot), slice(self.k_shot, None)
        flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
        return Episode(flat(chosen[:, s]), labels[:, s].ravel(), flat(chosen[:, q]), labels[:, q].ravel())
