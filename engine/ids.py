"""Slot ids: the checks of ids a caller gives, and fresh ids for slots written without.

Used alike by :class:`~engine.memory.Memory` and :class:`~engine.cluster.ShardedMemory`
(which asks its shards which ids they hold). A memory that is shard ``s`` of ``n``
(:class:`~engine.options.ShardRole`) draws its fresh ids from ``i % n == s``, so ids stay
unique across shards with no coordination.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import checks
from .errors import DuplicateIdError, InvalidValueError, UnknownIdError
from .options import ShardRole

INT64_MAX = int(np.iinfo(np.int64).max)


def _listed(ids) -> str:
    ids = list(ids)
    return f"{ids[:10]}{' ...' if len(ids) > 10 else ''}"


def given(ids, n: int, *, upsert: bool, present: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``n`` ids a caller gave for new slots, checked: int64 in [0, 2**63), one per slot, none
    repeated, and (unless ``upsert``) none the memory holds (``present(ids)``: a bool each).

    Raises:
        InvalidValueError, DuplicateIdError
    """
    ids = checks.ids(ids)
    if len(ids) != n:
        raise InvalidValueError(f"{n} vectors but {len(ids)} ids")
    if len(np.unique(ids)) != n:
        raise DuplicateIdError("ids repeat within the batch")
    if not upsert and n:
        existing = ids[present(ids)]
        if len(existing):
            raise DuplicateIdError(f"ids already in the memory (pass upsert=True to replace): "
                                   f"{_listed(existing.tolist())}")
    return ids


def known(ids: np.ndarray, found: np.ndarray) -> None:
    """Raise UnknownIdError listing the ids not ``found`` (a bool each)."""
    if not found.all():
        unknown = ids[~found].tolist()
        raise UnknownIdError(f"unknown ids: {_listed(unknown)}", unknown)


def fresh(n: int, start: int, used: Callable[[], np.ndarray], role: ShardRole = ShardRole()
          ) -> tuple[np.ndarray, int]:
    """``n`` ids of ``role``'s class, and the id to start from next. Counts up from ``start``;
    once that would pass the int64 limit (a caller wrote ids near it), takes the lowest ids of
    the class not in ``used()`` (the sorted ids taken; asked only then)."""
    offset, stride = role.index, role.count
    first = start + (offset - start) % stride
    last = first + stride * (n - 1)
    if last <= INT64_MAX:
        return first + stride * np.arange(n, dtype=np.int64), last + 1
    taken = used()
    taken = taken[taken % stride == offset]
    room = offset + stride * np.arange(len(taken) + n, dtype=np.int64)
    free = np.setdiff1d(room, taken)[:n]
    if len(free) < n:  # pragma: no cover - 2**63 live slots
        raise InvalidValueError("no free ids left")
    return free, start


class Counter:
    """Fresh ids handed out in turn from ``start`` (none in ``used()``, see :func:`fresh`): a
    write that makes several batches of new slots (a compaction's merged slots) takes them
    from one."""

    def __init__(self, start: int, used: Callable[[], np.ndarray], role: ShardRole = ShardRole()):
        self.next, self.used, self.role = start, used, role
        self.handed: list[np.ndarray] = []  # what it gave out (past the int64 limit, fresh cannot tell)

    def take(self, n: int) -> np.ndarray:
        def taken() -> np.ndarray:
            return np.union1d(self.used(), np.concatenate(self.handed)) if self.handed else self.used()

        new, self.next = fresh(n, self.next, taken, self.role)
        self.handed.append(new)
        return new
