"""Snapshots: the whole slot table as one Arrow IPC file (written aside, fsynced, renamed),
its SHA-256 kept in the manifest and checked when read."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa

from ..errors import CorruptFileError, InvalidValueError, StorageError
from . import fsio
from .codec import CODEBOOK_KEY, Columns, snapshot_schema
from .manifest import FORMAT, FORMAT_VERSION


def write_snapshot(directory: Path, dir_fd: int, name: str, dim: int, kind: str, slots: Columns) -> str:
    """Write the slot table as an Arrow IPC file (temp file, fsync, rename); return its sha256.

    Raises:
        StorageError: nothing is left behind.
    """
    table = slots.snapshot_table(dim, kind, weights=bool((slots.weights != 1.0).any()), used=bool(slots.used.any()),
                                 metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    schema = table.schema
    tmp, final = directory / (name + ".tmp"), directory / name
    sink = _HashingSink()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            sink.fd = fd
            with pa.ipc.new_file(sink, schema) as writer:
                writer.write_table(table, max_chunksize=1 << 16)
            fsio.fsync(fd)
        finally:
            os.close(fd)
        fsio.rename(tmp, final)
        fsio.fsync_dir(dir_fd)
    except (OSError, pa.ArrowException) as exc:
        fsio.remove_quietly(tmp)
        fsio.remove_quietly(final)
        if isinstance(exc, OSError):
            raise fsio.storage_error(f"writing snapshot {name}", exc) from None
        raise StorageError(f"writing snapshot {name}: {exc}", None) from None
    return sink.hash.hexdigest()


class _HashingSink(fsio.FdSink):
    def __init__(self):
        super().__init__(-1)
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return super().write(data)


def read_snapshot(file: Path, entry: dict, dim: int, kind: str | None) -> Columns:
    try:
        with open(file, "rb") as f:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise CorruptFileError(f"{file}: the snapshot named by the manifest is missing") from None
    except OSError as exc:
        raise CorruptFileError(f"{file}: unreadable snapshot ({exc.strerror})") from None
    if h.hexdigest() != entry["sha256"]:
        raise CorruptFileError(f"{file}: checksum mismatch (sha256 {h.hexdigest()}, manifest says {entry['sha256']})")
    if kind is None:  # no label was ever written: only an empty snapshot (int64 labels) fits
        if entry["rows"] != 0:
            raise CorruptFileError(f"{file}: the manifest gives no label kind for its {entry['rows']} rows")
        kind = "int"
    try:
        table = pa.ipc.open_file(file).read_all()
        names, types = table.schema.names, table.schema.types
        code_size = types[-1].byte_width if names[-1:] == ["code"] and pa.types.is_fixed_size_binary(types[-1]) \
            else None
        expected = snapshot_schema(dim, kind, weights="weight" in names, used="used" in names, code_size=code_size)
        if not table.schema.remove_metadata().equals(expected):
            raise InvalidValueError(f"unexpected schema {table.schema} for a memory of dim {dim} and {kind} labels")
        if code_size is not None and not (table.schema.metadata or {}).get(CODEBOOK_KEY):
            raise InvalidValueError("a code column without its codebook")
        slots = Columns.from_arrow(table, dim)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptFileError(f"{file}: unreadable snapshot ({exc})") from None
    if len(slots.ids) != entry["rows"]:
        raise CorruptFileError(f"{file}: {len(slots.ids)} rows, manifest says {entry['rows']}")
    problem = slots.check()
    if problem:
        raise CorruptFileError(f"{file}: the snapshot holds {problem}")
    return slots
