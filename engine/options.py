"""A memory's options: each one's default, its check, its help text and its manifest form.

:class:`MemoryOptions` is the one place an option is named. :class:`~engine.memory.Memory`
keeps one (replacing it when a setting changes), a durable memory writes
:meth:`MemoryOptions.to_manifest` into its manifest and reads it back with
:meth:`MemoryOptions.from_manifest` (which also reads the forms older manifests wrote),
:class:`~engine.cluster.ShardedMemory` checks the options it passes its shards
(:data:`SHARD_OPTIONS`) with it, and the command line takes its help texts from :func:`help_text`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import checks
from .errors import InvalidValueError

METRICS = ("cosine", "ip", "l2")
PROBS = ("top-k", "full")
POLICIES = ("merge", "reservoir", "age", "distill")
# The keys a manifest keeps besides the options themselves.
STATE_KEYS = ("next_id", "calibration", "trained_on", "temperature_report")


def _real(x: Any) -> bool:
    return not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, float, np.integer, np.floating))


@dataclass(frozen=True)
class ShardRole:
    """Which part of a sharded memory a memory is: shard ``index`` of ``count``.

    It owns the ids ``i`` with ``i % count == index`` (its automatic ids are drawn from
    them), and holds ``share`` of the slots (default ``1 / count``), so an approximate
    index calibrates and searches for that share of each query's top-k (see
    :func:`engine.index.share_k`).
    """

    index: int = 0
    count: int = 1
    share: float | None = None

    def __post_init__(self) -> None:
        count = checks.integer("shard count", self.count)
        index = checks.integer("shard index", self.index, low=0)
        if index >= count:
            raise InvalidValueError(f"shard index must be below the shard count ({count}), got {index}")
        share = 1.0 / count if self.share is None else self.share
        if not _real(share) or not 0 < share <= 1:
            raise InvalidValueError(f"share must be a number in (0, 1], got {share!r}")
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "share", float(share))

    def owner(self, ids: np.ndarray) -> np.ndarray:
        """The shard (of ``count``) each id belongs to."""
        return ids % self.count


def _option(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"help": doc})


@dataclass(frozen=True)
class MemoryOptions:
    """Every option of a memory, checked when made (bad ones raise ``InvalidValueError``)."""

    metric: str = _option("cosine", "cosine, ip or l2 (negative squared distance).")
    index: str = _option("auto", "auto or a FAISS factory string (Flat, HNSW32, IVF1024,Flat, ...).")
    temperature: float | str = _option("auto", 'Attention temperature: a number, or "auto" (chosen on the '
                                               "memory's own slots as it grows).")
    nprobe: int | None = _option(None, "IVF lists a query visits, fixed (default: calibrated).")
    ef_search: int | None = _option(None, "HNSW search breadth, fixed (default: calibrated).")
    budget: int | str | None = _option(None, "Keep the memory within this many slots (or bytes: 64MB), "
                                             "compacting when an add passes it.")
    slack: float = _option(0.1, "How far below the budget automatic compaction goes.")
    policy: str = _option("merge", "Compaction policy under a budget: merge, reservoir, age, distill.")
    rescore: bool = _option(True, "With a lossy index, keep float32 vectors to rescore what is retrieved.")
    recall: float | None = _option(None, "Calibrate the breadth for this recall@64 instead of the answer.")
    track_usage: bool | None = _option(None, "Keep each slot's last use (the age policy needs it; "
                                             "default: with policy age).")
    probs: str = _option("top-k", "What answers' probabilities are: 'top-k' (renormalised over the top-k "
                                  "slots) or 'full' (attention over the whole memory, the rest estimated).")
    centre: tuple[float, ...] | None = _option(None, "l2 only: the point slots are held around "
                                                     "(default: chosen from the first slots written).")
    shard: ShardRole = _option(ShardRole(), "Which shard of a sharded memory this memory is.")

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.metric not in METRICS:
            raise InvalidValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if not isinstance(self.index, str):
            raise InvalidValueError(f"index must be a string, got {self.index!r}")
        if isinstance(self.temperature, str):
            if self.temperature != "auto":
                raise InvalidValueError(f'temperature must be a number or "auto", got {self.temperature!r}')
        else:
            put("temperature", checks.temperature(self.temperature))
        put("nprobe", checks.optional_integer("nprobe", self.nprobe))
        put("ef_search", checks.optional_integer("ef_search", self.ef_search))
        if self.budget is not None:
            budget = int(self.budget) if isinstance(self.budget, np.integer) else self.budget
            parse_budget(budget, 1.0)  # checked now; read in slots against the memory's own bytes
            put("budget", budget)
        put("slack", checks.fraction("slack", self.slack, low=0.0, high=1.0))
        if self.policy not in POLICIES:
            raise InvalidValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")
        if not isinstance(self.rescore, bool):
            raise InvalidValueError(f"rescore must be True or False, got {self.rescore!r}")
        if self.recall is not None:
            if not _real(self.recall) or not 0 < self.recall <= 1:
                raise InvalidValueError(f"recall must be None or a number in (0, 1], got {self.recall!r}")
            put("recall", float(self.recall))
        if self.track_usage is not None and not isinstance(self.track_usage, bool):
            raise InvalidValueError(f"track_usage must be True, False or None, got {self.track_usage!r}")
        if self.policy == "age" and not self.tracks_usage:
            raise InvalidValueError(AGE_NEEDS_USAGE)
        if self.probs not in PROBS:
            raise InvalidValueError(f"probs must be one of {PROBS}, got {self.probs!r}")
        if self.centre is not None:
            if self.metric != "l2":
                raise InvalidValueError(f"a centre is for metric='l2' only, not {self.metric!r}")
            try:
                centre = tuple(float(c) for c in np.asarray(self.centre, np.float64).reshape(-1))
            except (TypeError, ValueError):
                raise InvalidValueError("centre must be a sequence of finite numbers") from None
            put("centre", centre)
        if not isinstance(self.shard, ShardRole):
            raise InvalidValueError(f"shard must be a ShardRole, got {self.shard!r}")

    # -- what follows from the options --------------------------------------------------
    @property
    def tracks_usage(self) -> bool:
        """Whether slots keep their last use: ``track_usage``, by default with the age policy."""
        return self.policy == "age" if self.track_usage is None else self.track_usage

    @property
    def auto_temperature(self) -> bool:
        return self.temperature == "auto"

    def checked_for(self, dim: int) -> MemoryOptions:
        """These options checked against a memory of ``dim`` (its index string, its centre)."""
        from .index import validate_spec

        validate_spec(dim, self.index, self.metric)
        checks.centre(self.centre, dim, self.metric)
        return self

    def check_policy(self, policy: str) -> None:
        """Refuse a compaction policy these options cannot run."""
        if policy not in POLICIES:
            raise InvalidValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        if policy == "age" and not self.tracks_usage:
            raise InvalidValueError(AGE_NEEDS_USAGE)

    def replace(self, **changes: Any) -> MemoryOptions:
        """A copy with ``changes``, checked."""
        return dataclasses.replace(self, **changes)

    # -- the manifest -------------------------------------------------------------------
    def to_manifest(self) -> dict:
        """The options as a manifest keeps them (JSON values)."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("shard", "centre")}
        doc["centre"] = None if self.centre is None else list(self.centre)
        doc.update(id_stride=self.shard.count, id_offset=self.shard.index, share=self.shard.share)
        return doc

    @classmethod
    def from_manifest(cls, doc: dict) -> MemoryOptions:
        """The options a manifest keeps. Keys other than options and :data:`STATE_KEYS` are
        refused; options missing take the value an older memory used: ``probs="top-k"`` (a
        memory written before full answers existed answered over its top-k)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"shard"}
        unknown = set(doc) - names - {"id_stride", "id_offset", "share"} - set(STATE_KEYS)
        if unknown:
            raise InvalidValueError(f"unknown settings {sorted(unknown)}")
        # a manifest written before a shard's share existed searched for the whole top-k
        role = ShardRole(index=doc.get("id_offset", 0), count=doc.get("id_stride", 1), share=doc.get("share", 1.0))
        return cls(**{"probs": "top-k", **{k: doc[k] for k in names if k in doc}}, shard=role)


# Options a sharded memory takes for its shards (its budget and path are its own).
SHARD_OPTIONS = ("metric", "index", "temperature", "nprobe", "ef_search", "slack", "policy", "rescore", "recall",
                 "track_usage")
AGE_NEEDS_USAGE = 'the age policy needs usage times: make the memory with track_usage=True (or policy="age")'


def help_text(name: str) -> str:
    """The help text of option ``name`` (the command line's)."""
    return str(MemoryOptions.__dataclass_fields__[name].metadata["help"])


def parse_budget(budget: Any, bytes_per_slot: float) -> int:
    """A budget in slots: an int as is, bytes ("64MB", "2GB", "500000B") over the bytes a slot takes.

    Raises:
        InvalidValueError: not a positive int or a size string.
    """
    import re

    if isinstance(budget, (int, np.integer)) and not isinstance(budget, (bool, np.bool_)):
        if budget < 1:
            raise InvalidValueError(f"budget must be at least 1 slot, got {budget}")
        return int(budget)
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?B)\s*", budget.upper())
        if m:
            nbytes = float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[m.group(2)]
            return max(1, int(nbytes // bytes_per_slot))
    raise InvalidValueError(f"budget must be a number of slots or bytes such as '64MB', got {budget!r}")
