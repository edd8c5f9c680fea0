"""The similarity a memory attends by, and how each is computed with inner products.

- "cosine": s(q, x) = q.x over L2-normalised vectors and queries;
- "ip": s(q, x) = q.x as given;
- "l2": s(q, x) = -|q - x|^2, the softmax of Matching Networks' squared-distance variant.

Inside, every metric is an inner product: the index, the exact top-k, the tail estimate
and its certificate, calibration and compaction all compute q.x. "l2" gets there by
lifting each slot to ``x' = (x, |x|^2)`` and each query to ``q' = (2q, -1)``:
``q'.x' = 2 q.x - |x|^2 = -|q - x|^2 + |q|^2``. The last term is the same for every
slot of a query, so the softmax, the top-k and every mass ratio (hence ``tail_bound``)
are those of ``-|q - x|^2``: the certificate of the inner product carries over as it
is. A slot is stored, read back and persisted as the caller wrote it (dim columns);
only the index and the slot table in memory hold the lifted ``dim + 1``.

Scores are float32, as FAISS computes them; for "l2" they carry |q|^2, so their
rounding grows with the vectors' norms (checks keep |x| <= MAX_L2_NORM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("cosine", "ip", "l2")


@dataclass(frozen=True)
class Metric:
    """A memory's metric and the maps between what callers see and what the index holds."""

    name: str

    @property
    def lifted(self) -> bool:
        """Whether slots and queries are lifted (l2)."""
        return self.name == "l2"

    def index_dim(self, dim: int) -> int:
        """Columns the index and the in-memory slot table hold for ``dim``-dimensional slots."""
        return dim + 1 if self.lifted else dim

    def slots(self, v: np.ndarray) -> np.ndarray:
        """Checked (n, dim) float32 slots as the index holds them."""
        if not self.lifted:
            return v
        sq = np.einsum("ij,ij->i", v, v, dtype=np.float64)
        return np.ascontiguousarray(np.hstack([v, sq.astype(np.float32)[:, None]]), dtype=np.float32)

    def queries(self, q: np.ndarray) -> np.ndarray:
        """Checked (n, dim) float32 queries as the index is searched with."""
        if not self.lifted:
            return q
        return np.ascontiguousarray(np.hstack([2 * q, -np.ones((len(q), 1), np.float32)]), dtype=np.float32)

    def stored(self, v: np.ndarray | None) -> np.ndarray | None:
        """Slots as the index holds them, back as the caller wrote them (None stays None)."""
        if v is None or not self.lifted:
            return v
        return np.ascontiguousarray(v[:, :-1])

    def slot_queries(self, v: np.ndarray) -> np.ndarray:
        """Slots as the index holds them, asked as queries (calibration, the temperature's
        leave-one-out): each one's own slot is then its best match."""
        return self.queries(self.stored(v)) if self.lifted else v
