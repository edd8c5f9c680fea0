"""Exceptions raised at engine's boundary.

Each one subclasses the built-in a caller would guess (ValueError, KeyError), so
``except ValueError`` keeps working, and ``except EngineError`` catches them all.
"""

from __future__ import annotations

import numpy as np


class EngineError(Exception):
    """Base class of every error engine raises on purpose."""


class DimensionError(EngineError, ValueError):
    """Vectors or queries whose shape does not match the memory's dimension."""


class InvalidValueError(EngineError, ValueError):
    """NaN or inf values, bad weights, mismatched lengths, bad labels."""


class DuplicateIdError(EngineError, ValueError):
    """An ``add`` named ids that are already in the memory (and ``upsert`` was off)."""


class UnknownIdError(EngineError, KeyError):
    """Ids that are not in the memory. ``ids`` lists them."""

    def __init__(self, message: str, ids: list[int]):
        super().__init__(message)
        self.ids = ids

    def __reduce__(self):  # pickles whole (Ray sends a shard's errors to the driver)
        return type(self), (self.args[0], self.ids)

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class UnknownLabelError(EngineError, KeyError):
    """Labels that no slot of the memory has (in a ``remove(labels=...)``); nothing changed.

    Attributes:
        labels: the unknown labels.
    """

    def __init__(self, message: str, labels=()):
        super().__init__(message)
        self.labels = list(labels)

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return type(self), (self.args[0], self.labels)


class EmptyMemoryError(EngineError, ValueError):
    """A query (or an operation that needs slots) on a memory with no slots."""


class CorruptFileError(EngineError):
    """A snapshot, write-ahead log or manifest that fails its checks."""


class FormatVersionError(CorruptFileError):
    """A memory directory written by an engine format this version cannot read."""


class MissingFileError(EngineError, FileNotFoundError):
    """A file or directory the caller named is not there (input files, datasets, checkpoints)."""


class IndexOutOfRangeError(EngineError, IndexError):
    """A query number past the end of a result (``res[i]``)."""


class UsageError(EngineError, RuntimeError):
    """A call made out of order (a model queried before its support set was given)."""


class OutputExistsError(EngineError, FileExistsError):
    """A file or directory the command line was asked to write exists already."""


class MemoryNotFoundError(EngineError, FileNotFoundError):
    """No memory at the path given (no manifest, or no sharded memory's root file)."""


class MemoryExistsError(EngineError, FileExistsError):
    """Creating a durable memory in a directory that already holds one."""


class StorageError(EngineError, OSError):
    """A write failed on the disk (full, read-only, failing): the write was not applied.

    ``errno`` is the OS error (ENOSPC, EIO, EFBIG, ...). ``uncertain`` is True when
    the disk may or may not hold that one write (a failed fsync or rename): the
    memory then refuses further writes (:class:`MemoryFailedError`) until it is
    reopened, and the reopened memory holds the write either whole or not at all.
    Every write acknowledged before it is safe either way.
    """

    def __init__(self, message: str, errno_: int | None = None, *, uncertain: bool = False):
        super().__init__(message)
        self.errno = errno_
        self.uncertain = uncertain

    def __reduce__(self):
        return _storage_error, (type(self), self.args[0], self.errno, self.uncertain)

    def __str__(self) -> str:
        return str(self.args[0])


class MemoryFailedError(StorageError):
    """The memory refuses writes since an earlier I/O error left its files uncertain; reopen it."""


class MemoryLockedError(EngineError):
    """A durable memory's directory is already open for writing (one writer per directory)."""


class UnknownMemoryError(EngineError, KeyError):
    """A served memory name that the server does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


class AuthenticationError(EngineError):
    """A server refused the request's bearer token (missing or wrong); nothing changed.
    (``engine.Client`` raises it as a ``pyarrow.flight.FlightUnauthenticatedError`` too.)"""


class ServerUnavailableError(EngineError):
    """No server answered at the client's location (not running, unreachable, or the call
    timed out). (``engine.Client`` raises it as a ``pyarrow.flight.FlightUnavailableError``
    too.)"""


class MissingExtraError(EngineError, ImportError):
    """A feature needs a package of an optional extra that is not installed; the message
    names the extra (``pip install 'engine[nn]'``)."""


class ServerBusyError(EngineError):
    """A server has more queries waiting than it is configured to hold: try again shortly
    (the request was not answered, and nothing changed)."""


class ShardUnavailableError(EngineError, ConnectionError):
    """A shard of a sharded memory did not answer (its actor died and is restarting, or its
    node is gone).

    Attributes:
        shards: the indexes of the shards that did not answer.
        written: for an add, the ids the other shards wrote (durable, though the call failed).
    """

    def __init__(self, message: str, shards=(), written=None):
        super().__init__(message)
        self.shards = list(shards)
        self.written = np.empty(0, np.int64) if written is None else np.asarray(written, np.int64)

    def __reduce__(self):
        return type(self), (self.args[0], self.shards, self.written)


def _storage_error(cls, message, errno_, uncertain):
    return cls(message, errno_, uncertain=uncertain)
