"""Clustered synthetic embeddings for tests and benchmarks.

The generator (seeded, so every run sees the same data): ``n_classes // 10``
group centres drawn uniformly on the unit sphere; each class centre lies at
angular spread ``class_spread`` around a group centre (classes of a group look
alike, as related classes do); each class has ``modes`` sub-centres
at angular spread ``mode_spread`` around its centre (classes are multi-modal, as
learned embeddings are); a sample is a sub-centre plus isotropic Gaussian noise of
scale ``noise`` per unit of norm. With the defaults neighbouring classes overlap,
so nearest-neighbour accuracy is high but not perfect.

``noise_decay = a > 0`` makes the noise anisotropic, as in learned embeddings:
its variance along the i-th axis of a random rotation falls as ``i ** -a``
(total variance unchanged). Learned 64-d Matching Network embeddings of
Fashion-MNIST have within-class residuals whose participation ratio (the
effective number of dimensions, ``(sum l)^2 / sum l^2`` over the eigenvalues)
is about 17 and a mean cosine of 0.91 to their class centre; ``noise_decay=1``
gives a participation ratio of 14 at d = 64 (isotropic noise: 64). The scale
benchmark uses :data:`LEARNED_LIKE`.
"""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 16  # rows drawn at a time: a few float64 temporaries of 0.5 GiB each at d = 1,024


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rows(m: int, dim: int, fill) -> np.ndarray:
    """A float32 (m, dim) array filled ``CHUNK`` rows at a time by ``fill(start, stop)``.

    Drawing a generator's normals in row chunks gives the very normals one draw of the
    whole array would, so the data does not depend on the chunk size (up to the last bit
    of a product computed per chunk); only the float64 scratch of one chunk is held, not
    of all ``m`` rows (8 GiB at 1M x 1,024)."""
    out = np.empty((m, dim), dtype=np.float32)
    for start in range(0, m, CHUNK):
        stop = min(m, start + CHUNK)
        out[start:stop] = fill(start, stop)
    return out


def clustered(
    n: int,
    dim: int,
    *,
    n_classes: int = 100,
    modes: int = 4,
    class_spread: float = 0.8,
    mode_spread: float = 0.5,
    noise: float = 1.1,
    noise_decay: float = 0.0,
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
    shape = None
    if noise_decay > 0:  # per-axis std along a random rotation, scaled to keep the total variance
        scale = np.arange(1, dim + 1) ** (-noise_decay / 2)
        rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        shape = (scale * np.sqrt(dim) / np.linalg.norm(scale))[:, None] * rotation.T

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, n_classes, m)
        mode = rng.integers(0, modes, m)

        def fill(start: int, stop: int) -> np.ndarray:
            eps = rng.standard_normal((stop - start, dim))
            if shape is not None:
                eps = eps @ shape
            return subs[labels[start:stop], mode[start:stop]] + noise / np.sqrt(dim) * eps

        return _rows(m, dim, fill), labels.astype(np.int64)

    x, y = draw(n)
    if queries:
        return (x, y, *draw(queries))
    return x, y


# Settings close to learned embeddings (see the module docstring): used by bench/scale.py.
LEARNED_LIKE = {"modes": 4, "class_spread": 0.3, "mode_spread": 0.3, "noise": 0.6, "noise_decay": 1.0}


def isotropic(n: int, dim: int, *, n_classes: int = 2000, noise: float = 1.0, seed: int = 0, queries: int = 0):
    """Isotropic clusters around random unit centres (Gaussian noise of ``noise`` per unit
    of norm), few slots per class when ``n_classes`` is large: a harder case for an
    inverted file than :func:`clustered`, harder still as ``noise`` grows.

    Returns:
        As :func:`clustered`.
    """
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_classes, dim)))

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, n_classes, m)
        x = _rows(m, dim, lambda a, b: centres[y[a:b]] + noise * rng.standard_normal((b - a, dim)) / np.sqrt(dim))
        return x, y.astype(np.int64)

    x, y = draw(n)
    return (x, y, *draw(queries)) if queries else (x, y)


def uniform(n: int, dim: int, *, n_classes: int = 10, seed: int = 0, queries: int = 0):
    """Gaussian vectors with random labels, no structure at all: the hardest case for an
    inverted file (labels carry no signal; only search recall means anything here).

    Returns:
        As :func:`clustered`.
    """
    rng = np.random.default_rng(seed)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        x = _rows(m, dim, lambda a, b: rng.standard_normal((b - a, dim)))
        return x, rng.integers(0, n_classes, m).astype(np.int64)

    x, y = draw(n)
    return (x, y, *draw(queries)) if queries else (x, y)


# Distributions of different difficulty, by name: (n, dim, seed, queries) -> (x, y, qx, qy).
# The benchmarks and tests check the engine's defaults on each.
DISTRIBUTIONS = {
    "learned-like": lambda n, dim, seed, queries: clustered(n, dim, n_classes=max(10, n // 100), seed=seed,
                                                           queries=queries, **LEARNED_LIKE),
    "clustered": lambda n, dim, seed, queries: clustered(n, dim, n_classes=100, seed=seed, queries=queries),
    "isotropic": lambda n, dim, seed, queries: isotropic(n, dim, n_classes=2000, seed=seed, queries=queries),
    "isotropic-hard": lambda n, dim, seed, queries: isotropic(n, dim, n_classes=2000, noise=1.2, seed=seed,
                                                           queries=queries),
    "uniform": lambda n, dim, seed, queries: uniform(n, dim, seed=seed, queries=queries),
}
