"""Injected disk faults: make the store's I/O primitives fail the way a failing disk does.

Every byte the engine writes goes through :mod:`engine.store.fsio`, so replacing its
primitives reaches every write path (log appends, snapshots, the manifest).
A fault can write part of the data first (a full disk takes some bytes, then
refuses), so torn records are real, not simulated by the reader.
"""

from __future__ import annotations

import errno
import random

from engine.store import fsio

PRIMITIVES = ("write_all", "fsync", "fsync_dir", "rename", "truncate")


class Faults:
    """Arm failures of fsio primitives: ``arm("fsync", errno.EIO)`` fails the next fsync.

    Args:
        patch: a ``setattr(obj, name, value)`` that undoes itself (pytest's monkeypatch.setattr),
            or plain ``setattr`` in a child process.
        rate: in random mode, the chance that any one primitive call fails.
        seed: seed of random mode.
    """

    def __init__(self, patch=setattr, *, rate: float = 0.0, seed: int = 0):
        self.armed: dict[str, list] = {}
        self.rate, self.rng = rate, random.Random(seed)
        self.injected = 0
        self.originals = {name: getattr(fsio, name) for name in PRIMITIVES}
        for name in PRIMITIVES:
            patch(fsio, name, self._wrap(name))

    def arm(self, name: str, code: int = errno.ENOSPC, *, skip: int = 0, times: int = 1) -> None:
        """Fail the call of ``name`` after ``skip`` more good ones, ``times`` times."""
        self.armed[name] = [skip, times, code]

    def disarm(self) -> None:
        self.armed.clear()
        self.rate = 0.0

    def _should_fail(self, name: str):
        plan = self.armed.get(name)
        if plan is not None:
            if plan[0] > 0:
                plan[0] -= 1
                return None
            plan[1] -= 1
            if plan[1] <= 0:
                del self.armed[name]
            return plan[2]
        if self.rate and self.rng.random() < self.rate:
            return self.rng.choice([errno.ENOSPC, errno.EIO] if name == "write_all" else [errno.EIO])
        return None

    def _wrap(self, name: str):
        original = self.originals[name]

        def wrapper(*args):
            code = self._should_fail(name)
            if code is None:
                return original(*args)
            self.injected += 1
            if name == "write_all":  # a full disk takes part of the data, then refuses
                data = memoryview(args[1]).cast("B")
                original(args[0], data[: self.rng.randrange(len(data) + 1)] if len(data) else data)
            raise OSError(code, f"injected {errno.errorcode[code]} in {name}")

        return wrapper
