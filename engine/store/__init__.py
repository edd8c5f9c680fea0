"""A durable memory's files: the directory and its lock, the manifest (the commit point),
Arrow snapshots and the write-ahead log (:mod:`.wal`), with fsync discipline in :mod:`.fsio`
and the Arrow columns of slots in :mod:`.codec`. Only this package names a memory's files."""

from .directory import Recovered, Store, holds_memory
from .manifest import manifest_bytes, read_manifest

__all__ = ["Recovered", "Store", "holds_memory", "manifest_bytes", "read_manifest"]
