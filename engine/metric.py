"""The similarity a memory attends by, and how l2 is carried by inner products.

- "cosine": s(q, x) = q.x over L2-normalised vectors and queries;
- "ip": s(q, x) = q.x as given;
- "l2": s(q, x) = -|q - x|^2, the softmax of Matching Networks' squared-distance variant.

Past the index, the engine computes inner products: the tail estimate and its
certificate, the dense route, rescoring. "l2" is carried to them by lifting, around a
centre ``c`` of the memory's own: each slot is held as ``x' = (x - c, |x - c|^2)`` and
each query asks as ``q' = (2 (q - c), -1)``, so ``q'.x' = |q - c|^2 - |q - x|^2``. The
first term is one constant per query: the softmax, the top-k and every mass ratio
(``tail_bound``) are those of ``-|q - x|^2``, and every score the engine hands out is
``-|q - x|^2`` itself (the constant taken off where a score is made), so memories with
other centres (shards) answer in the same units.

The centre keeps float32 honest: ``|q - c|^2`` and ``|x - c|^2`` are of the size of the
distances, not of the vectors' norms, so a memory of vectors far from the origin (a
large offset, a small spread) scores as precisely as one around it. It is chosen once,
from the first slots written (:func:`centre_of`), and kept in the manifest. FAISS holds
``x - c`` in an L2 index (its lists, graph and codes made on distances).

A slot is read back and persisted as ``(x - c) + c``: the vector as written wherever
the subtraction was exact, which it is for every coordinate within a factor of two of
its centre (Sterbenz) and for every coordinate the centre leaves at 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import overload

import numpy as np

# a coordinate is centred when its mean is this many standard deviations from 0
OFFSET = 4.0


@dataclass(frozen=True)
class Metric:
    """A memory's metric and the maps between what callers see and what the index holds."""

    name: str
    centre: np.ndarray | None = None  # l2: (dim,) float32, once chosen; None before the first write

    @property
    def lifted(self) -> bool:
        """Whether slots and queries are lifted (l2)."""
        return self.name == "l2"

    def index_dim(self, dim: int) -> int:
        """Columns the index and the in-memory slot table hold for ``dim``-dimensional slots."""
        return dim + 1 if self.lifted else dim

    def with_centre(self, vectors: np.ndarray) -> Metric:
        """This metric, centred on ``vectors`` (the first written) if it has no centre yet."""
        if not self.lifted or self.centre is not None:
            return self
        return Metric(self.name, centre_of(vectors))

    def _c(self, dim: int) -> np.ndarray:
        return self.centre if self.centre is not None else np.zeros(dim, np.float32)

    def slots(self, v: np.ndarray) -> np.ndarray:
        """Checked (n, dim) float32 slots as the index holds them."""
        if not self.lifted:
            return v
        x = v - self._c(v.shape[1])
        sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        return np.ascontiguousarray(np.hstack([x, sq.astype(np.float32)[:, None]]), dtype=np.float32)

    def queries(self, q: np.ndarray) -> np.ndarray:
        """Checked (n, dim) float32 queries as the index is searched with."""
        if not self.lifted:
            return q
        x = q - self._c(q.shape[1])
        return np.ascontiguousarray(np.hstack([2 * x, -np.ones((len(q), 1), np.float32)]), dtype=np.float32)

    @overload
    def stored(self, v: np.ndarray) -> np.ndarray: ...

    @overload
    def stored(self, v: None) -> None: ...

    def stored(self, v: np.ndarray | None) -> np.ndarray | None:
        """Slots as the index holds them, back as the caller wrote them (None stays None)."""
        if v is None or not self.lifted:
            return v
        return np.ascontiguousarray(v[:, :-1] + self._c(v.shape[1] - 1))

    def slot_queries(self, v: np.ndarray) -> np.ndarray:
        """Slots as the index holds them, asked as queries (calibration, the temperature's
        leave-one-out): each one's own slot is then its best match."""
        if not self.lifted:
            return v
        return np.ascontiguousarray(np.hstack([2 * v[:, :-1], -np.ones((len(v), 1), np.float32)]),
                                    dtype=np.float32)

    def replayed(self, writes):
        """Replayed writes (drop, columns) with their vectors as the index holds them."""
        for drop, cols in writes:
            if cols is not None and cols.vectors is not None and self.lifted:
                cols = dataclasses.replace(cols, vectors=self.slots(cols.vectors))
            yield drop, cols

    def persisted(self, cols):
        """Snapshot columns with the vectors as the caller wrote them."""
        if cols.vectors is None or not self.lifted:
            return cols
        return dataclasses.replace(cols, vectors=self.stored(cols.vectors))

    def as_setting(self):
        """The centre as the manifest keeps it (a list of floats, or None)."""
        return None if self.centre is None else [float(c) for c in self.centre]


def centre_of(vectors: np.ndarray) -> np.ndarray:
    """The centre of l2 slots: each coordinate's mean where it lies OFFSET standard deviations
    or more from 0 (a single slot: itself), else 0, rounded to float32."""
    v = np.asarray(vectors, np.float64)
    mean, std = v.mean(axis=0), v.std(axis=0)
    return np.where(np.abs(mean) >= OFFSET * std, mean, 0.0).astype(np.float32)


def lifted_query_sq(q: np.ndarray) -> np.ndarray:
    """|q - c|^2 of lifted queries q' = (2 (q - c), -1), float64: what a lifted score carries."""
    head = np.asarray(q[:, :-1], np.float64)
    return np.einsum("nd,nd->n", head, head) / 4
