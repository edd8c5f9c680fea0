"""A readers-writer lock: any number of readers, or one writer.

Writers are preferred: once a writer waits, new readers queue behind it, so a
steady stream of queries cannot starve writes (or the swap at the end of a
rebuild or compaction).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    """Shared (read) / exclusive (write) lock for the memory's state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._shared = _Shared(self)

    def read(self) -> _Shared:
        """Hold the lock shared for the duration of a ``with`` block (a plain object, not a
        generator: queries take it on every call)."""
        return self._shared

    def _acquire_shared(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively for the duration of the block."""
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Shared:
    """The context manager :meth:`RWLock.read` returns."""

    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock):
        self._lock = lock

    def __enter__(self) -> None:
        self._lock._acquire_shared()

    def __exit__(self, *exc) -> None:
        self._lock._release_shared()
