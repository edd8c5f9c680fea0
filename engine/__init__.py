"""engine: a scalable memory-retrieval engine for Matching Networks.

The public API, re-exported by name.
"""

from .errors import (
    AuthenticationError,
    CorruptFileError,
    DimensionError,
    DuplicateIdError,
    EmptyMemoryError,
    EngineError,
    FormatVersionError,
    InvalidValueError,
    MemoryExistsError,
    MemoryFailedError,
    MemoryLockedError,
    MissingExtraError,
    ServerBusyError,
    ServerUnavailableError,
    ShardUnavailableError,
    StorageError,
    UnknownIdError,
    UnknownLabelError,
    UnknownMemoryError,
)
from .index import BareSearch, SearchSettings
from .memory import Memory
from .results import CompactionReport, MemoryStats, QueryResult, Slots
from .serve.client import Client

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
    "InvalidValueError",
    "Memory",
    "MemoryExistsError",
    "MemoryFailedError",
    "MemoryLockedError",
    "MemoryStats",
    "QueryResult",
    "SearchSettings",
    "MissingExtraError",
    "ServerBusyError",
    "ServerUnavailableError",
    "ShardUnavailableError",
    "Slots",
    "StorageError",
    "UnknownIdError",
    "UnknownLabelError",
    "UnknownMemoryError",
]
__version__ = "0.1.0"
