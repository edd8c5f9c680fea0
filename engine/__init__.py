"""engine: a scalable memory-retrieval engine for Matching Networks.

The public API, re-exported by name.
"""

from .errors import (
    CorruptFileError,
    DimensionError,
    DuplicateIdError,
    EmptyMemoryError,
    EngineError,
    FormatVersionError,
    InvalidValueError,
    MemoryExistsError,
    MemoryLockedError,
    UnknownIdError,
)
from .memory import Memory
from .results import MemoryStats, QueryResult, Slots

__all__ = [
    "CorruptFileError",
    "DimensionError",
    "DuplicateIdError",
    "EmptyMemoryError",
    "EngineError",
    "FormatVersionError",
    "InvalidValueError",
    "Memory",
    "MemoryExistsError",
    "MemoryLockedError",
    "MemoryStats",
    "QueryResult",
    "Slots",
    "UnknownIdError",
]
__version__ = "0.1.0"
