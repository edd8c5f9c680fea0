"""One shard of a :class:`~engine.cluster.ShardedMemory`: a durable :class:`engine.Memory`
in its own directory, run by a Ray actor.

Shard ``s`` of ``n`` owns the ids ``i`` with ``i % n == s``, and gives fresh slots ids of
that residue itself, so ids stay global with no coordination between shards or drivers.
Ray restarts a dead shard (``max_restarts``); its ``__init__`` then reopens the directory
(snapshot + log replay), so every acknowledged write is back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CorruptFileError
from ..memory import Memory
from ..options import ShardRole
from ..results import CompactionReport, MemoryStats, Retrieved, Slots
from ..store import holds_memory

SHARD_FILE = "shard.json"  # in each shard's directory: which sharded memory it belongs to, as which shard


class Shard:
    """The actor body (wrapped by ``ray.remote`` in :mod:`engine.cluster.sharded`)."""

    def __init__(self, path: str, index: int, count: int, dim: int, options: dict, create: bool = False):
        self.index, self.count = index, count
        path = Path(path)
        if holds_memory(path):
            self.mem = Memory.open(path)
        elif not create or not (path / SHARD_FILE).exists():
            # a reopened (or restarted) shard whose memory is gone is never made anew: its slots would be lost
            raise CorruptFileError(f"{path}: no memory in the shard's directory")
        else:  # fresh ids (added or merged) of this shard's class: id % count == index; a 1/count
            # share of the slots, so its search aims at its share of each query's top-k
            self.mem = Memory(dim, path=path, shard=ShardRole(index, count), **options)

    def add(self, vectors: np.ndarray, labels, ids: np.ndarray | None, weights: np.ndarray | None,
            upsert: bool) -> np.ndarray:
        return self.mem.add(vectors, labels, ids=ids, weights=weights, upsert=upsert)

    def retrieve(self, queries: np.ndarray, k: int, probs: str = "top-k") -> Retrieved | None:
        """Top-k of this shard (and its class masses, with ``probs="full"``); None when it
        holds no slot."""
        if len(self.mem) == 0:
            return None
        return self.mem.retrieve(queries, k=k, probs=probs)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return np.array([int(i) in self.mem for i in ids], bool)

    def ids(self, labels=None) -> np.ndarray:
        return self.mem.ids(labels)

    def remove(self, ids: np.ndarray) -> int:
        return self.mem.remove(ids)

    def remove_labels(self, labels: list) -> int:
        """Remove every slot this shard holds of ``labels`` (one it no longer holds removes
        nothing: the driver checked that each is held somewhere before any shard removed)."""
        return self.mem.remove(self.mem.ids(labels=labels))

    def get(self, ids: np.ndarray) -> Slots:
        return self.mem.get(ids)

    def compact(self, options: dict) -> CompactionReport | None:
        if len(self.mem) == 0:
            return None
        return self.mem.compact(**options)

    def stats(self) -> MemoryStats:
        return self.mem.stats()

    def size(self) -> int:
        return len(self.mem)

    def describe(self) -> dict:
        """What the driver needs to know of this shard: size, mass, label kind, live classes."""
        return {"slots": len(self.mem), "total_weight": self.mem.total_weight, "label_kind": self.mem.label_kind,
                "classes": self.mem.classes(), "dim": self.mem.dim, "metric": self.mem.metric,
                "temperature": self.mem.temperature}

    def save(self) -> None:
        self.mem.save()

    def close(self) -> None:
        self.mem.close()

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node this shard runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()
