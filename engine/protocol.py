"""The verbs every memory answers, wherever it lives.

:class:`engine.Memory` (in process), :class:`engine.Client` (a served memory) and
:class:`engine.cluster.ShardedMemory` (shards on Ray) all satisfy :class:`MemoryLike`,
so code written against it runs unchanged on any of the three.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .results import CompactionReport, MemoryStats, QueryResult, Slots


@runtime_checkable
class MemoryLike(Protocol):
    """A memory of (id, label, weight, vector) slots with top-k attention."""

    def add(self, vectors, labels, *, ids=None, weights=None, upsert: bool = False) -> np.ndarray:
        """Write slots; returns their ids."""

    def query(self, queries, *, k: int = 64, tail: float | None = None, probs: str | None = None) -> QueryResult:
        """Attention over each query's top-k slots (``probs="full"``: over every slot, exact
        where scored and estimated beyond; default: the memory's own choice, "top-k")."""

    def remove(self, ids=None, *, labels=None) -> int:
        """Remove slots by id, or every slot of some labels; returns how many."""

    def ids(self, labels=None) -> np.ndarray:
        """The ids of every slot, or of the slots of some labels, ascending."""

    def get(self, ids) -> Slots:
        """Read slots back by id."""

    def classes(self) -> np.ndarray:
        """The labels with at least one live slot (the columns a query answers over)."""

    def compact(self, **options) -> CompactionReport:
        """Shrink to a budget, preserving each class's mass."""

    def stats(self) -> MemoryStats:
        """Size, index and bytes."""

    def save(self):
        """Make everything written so far durable in a snapshot."""

    def close(self) -> None:
        """Release the memory (its files, its connection)."""

    def __len__(self) -> int: ...

    def __contains__(self, id_) -> bool: ...
