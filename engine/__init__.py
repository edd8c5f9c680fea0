"""engine: a scalable memory-retrieval engine for Matching Networks.

The public API, re-exported by name. ``Client`` (Arrow Flight), ``ShardedMemory`` (Ray) and
``MatchingNetwork`` (torch) are imported on first use, so ``import engine`` loads none of them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    AuthenticationError,
    CorruptFileError,
    DimensionError,
    DuplicateIdError,
    EmptyMemoryError,
    EngineError,
    FormatVersionError,
    IndexOutOfRangeError,
    InvalidValueError,
    MemoryExistsError,
    MemoryFailedError,
    MemoryLockedError,
    MemoryNotFoundError,
    MissingExtraError,
    MissingFileError,
    OutputExistsError,
    ServerBusyError,
    ServerUnavailableError,
    ShardUnavailableError,
    StorageError,
    UnknownIdError,
    UnknownLabelError,
    UnknownMemoryError,
    UsageError,
)
from .index import BareSearch, SearchSettings
from .memory import Memory
from .options import MemoryOptions, ShardRole
from .results import CompactionReport, MemoryStats, QueryResult, Slots

# ``from engine import *`` brings Client but neither Ray nor torch
_LAZY = {"Client": "engine.serve.client", "ShardedMemory": "engine.cluster", "MatchingNetwork": "engine.nn"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = [
    "AuthenticationError",
    "BareSearch",
    "Client",
    "CompactionReport",
    "CorruptFileError",
    "DimensionError",
    "DuplicateIdError",
    "EmptyMemoryError",
    "EngineError",
    "FormatVersionError",
    "IndexOutOfRangeError",
    "InvalidValueError",
    "Memory",
    "MemoryOptions",
    "MemoryExistsError",
    "MemoryNotFoundError",
    "MemoryFailedError",
    "MemoryLockedError",
    "MemoryStats",
    "QueryResult",
    "SearchSettings",
    "ShardRole",
    "MissingExtraError",
    "MissingFileError",
    "OutputExistsError",
    "ServerBusyError",
    "ServerUnavailableError",
    "ShardUnavailableError",
    "Slots",
    "StorageError",
    "UnknownIdError",
    "UnknownLabelError",
    "UnknownMemoryError",
    "UsageError",
]
__version__ = "0.1.0"
