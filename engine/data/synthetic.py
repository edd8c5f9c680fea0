"""Clustered synthetic embeddings for tests and benchmarks.

The generator (seeded, so every run sees the same data): ``n_classes // 10``
group centres drawn uniformly on the unit sphere; each class centre lies at
angular spread ``class_spread`` around a group centre (classes of a group look
alike, as related classes do); each class has ``modes`` sub-centres
at angular spread ``mode_spread`` around its centre (classes are multi-modal, as
learned embeddings are); a sample is a sub-centre plus isotropic Gaussian noise of
scale ``noise`` per unit of norm. With the defaults neighbouring classes overlap,
so nearest-neighbour accuracy is high but not perfect.
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(
    n: int,
    dim: int,
    *,
    n_classes: int = 100,
    modes: int = 4,
    class_spread: float = 0.8,
    mode_spread: float = 0.5,
    noise: float = 1.1,
    seed: int = 0,
    queries: int = 0,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``n`` labelled vectors (and optionally ``queries`` more from the same distribution).

    Returns:
        (vectors float32 (n, dim), labels int64 (n,)), plus (query vectors, query labels)
        when ``queries > 0``.
    """
    rng = np.random.default_rng(seed)
    groups = _unit(rng.standard_normal((max(1, n_classes // 10), dim)))
    centres = _unit(groups[np.arange(n_classes) % len(groups)]
                    + class_spread / np.sqrt(dim) * rng.standard_normal((n_classes, dim)))
    subs = _unit(centres[:, None, :] + mode_spread / np.sqrt(dim) * rng.standard_normal((n_classes, modes, dim)))

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, n_classes, m)
        mode = rng.integers(0, modes, m)
        x = subs[labels, mode] + noise / np.sqrt(dim) * rng.standard_normal((m, dim))
        return x.astype(np.float32), labels.astype(np.int64)

    x, y = draw(n)
    if queries:
        return (x, y, *draw(queries))
    return x, y
