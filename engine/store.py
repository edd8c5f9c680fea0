"""Arrow persistence: snapshot + write-ahead log + manifest, and recovery.

A durable memory is a directory:

    manifest.json            format version, dim, metric, temperature, index spec,
                             the current snapshot (file, sha256, rows) and WAL segments
    snapshot-000007.arrow    Arrow IPC file: id, label, weight, vector (fixed_size_list<float32>[dim])
    wal-000008.arrows        Arrow IPC stream, append-only: one record batch per add/remove

The manifest is replaced atomically (temp file, fsync, rename, fsync of the
directory). Every WAL record carries a sequence number and a CRC32 of its values
in the batch's custom metadata, and is fsynced before the write returns.

Recovery loads the snapshot (checked against its sha256), then replays the WAL
segments in order. A segment may end in a torn record (the writer died while
appending it): a message cut short by the end of a segment is ignored. Any other failure
(a bad checksum, an unreadable header, a schema that does not match) is refused
with :class:`~engine.errors.CorruptFileError`. Nothing is ever pickled.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import CorruptFileError, FormatVersionError, MemoryExistsError, MemoryLockedError

FORMAT = "engine-memory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = "LOCK"  # flock'ed by the one Store that may write the directory

OP_ADD, OP_UPSERT, OP_REMOVE = 0, 1, 2


@dataclass
class Columns:
    """Slots as columns: what a snapshot holds and an add record carries."""

    ids: np.ndarray
    labels: list
    weights: np.ndarray
    vectors: np.ndarray
    created: np.ndarray
    last_used: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "Columns":
        z = np.empty(0, np.float64)
        return cls(np.empty(0, np.int64), [], z, np.empty((0, dim), np.float32), z, z)

    @classmethod
    def from_arrow(cls, data: pa.Table | pa.RecordBatch, dim: int) -> "Columns":
        return cls(data.column("id").to_numpy(), data.column("label").to_pylist(), data.column("weight").to_numpy(),
                   vectors_of(data.column("vector"), dim), data.column("created").to_numpy(),
                   data.column("last_used").to_numpy())

    def arrays(self, dim: int, kind: str) -> list[pa.Array]:
        """Arrow arrays in the order of :func:`slot_schema`."""
        flat = pa.array(np.ascontiguousarray(self.vectors, dtype=np.float32).reshape(-1))
        return [
            pa.array(np.asarray(self.ids, dtype=np.int64)),
            pa.array(self.labels, type=label_type(kind)),
            pa.array(np.asarray(self.weights, dtype=np.float64)),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.array(np.asarray(self.created, dtype=np.float64)),
            pa.array(np.asarray(self.last_used, dtype=np.float64)),
        ]


@dataclass
class Record:
    """One replayed WAL operation: ``slots`` for an add or upsert, ``ids`` alone for a remove."""

    op: int
    ids: np.ndarray
    slots: Columns | None = None


@dataclass
class Recovered:
    """What :meth:`Store.open` read back: config, snapshot columns and WAL records."""

    config: dict
    label_kind: str | None
    snapshot: Columns
    records: list[Record]


def label_type(kind: str) -> pa.DataType:
    return pa.int64() if kind == "int" else pa.string()


def slot_schema(dim: int, kind: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("label", label_type(kind), nullable=False),
            pa.field("weight", pa.float64(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("created", pa.float64(), nullable=False),
            pa.field("last_used", pa.float64(), nullable=False),
        ]
    )


def wal_schema(dim: int, kind: str) -> pa.Schema:
    return pa.schema([pa.field("op", pa.int8())] + list(slot_schema(dim, kind)))


def _crc(op: int, ids: np.ndarray, slots: Columns | None) -> int:
    c = zlib.crc32(bytes([op]))
    c = zlib.crc32(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), c)
    if slots is None:
        return c
    if slots.labels and isinstance(slots.labels[0], str):
        c = zlib.crc32(b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in slots.labels), c)
    else:
        c = zlib.crc32(np.asarray(slots.labels, dtype=np.int64).tobytes(), c)
    for col, dtype in ((slots.weights, np.float64), (slots.vectors, np.float32), (slots.created, np.float64),
                       (slots.last_used, np.float64)):
        c = zlib.crc32(np.ascontiguousarray(col, dtype=dtype).tobytes(), c)
    return c


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def vectors_of(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A fixed_size_list<float32>[dim] column as an (n, dim) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


class Store:
    """The files of one durable memory. Owned by a :class:`~engine.memory.Memory`."""

    def __init__(self, path: Path, manifest: dict, lock_fd: int):
        self.path = path
        self.manifest = manifest
        self._lock_fd = lock_fd
        self._wal_file = None
        self._wal_writer = None
        self._seq = 0

    @staticmethod
    def _lock(path: Path) -> int:
        """Take the directory's write lock; the kernel drops it if the process dies."""
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MemoryLockedError(f"{path} is already open (in this or another process); close it first") from None
        return fd

    # -- create / open ------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: dict) -> "Store":
        """Make a new memory directory. Refuses one that already holds a manifest."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise MemoryExistsError(f"{path} already holds a memory; open it with Memory.open({str(path)!r})")
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **config,
                    "label_kind": None, "snapshot": None, "wal": [], "generation": 0}
        store = cls(path, manifest, cls._lock(path))
        store._start_segment()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> tuple["Store", Recovered]:
        """Read a memory directory back: check the manifest, load the snapshot, read the WAL.

        Nothing is written; call :meth:`begin` before logging new writes.

        Raises:
            FileNotFoundError: no manifest in ``path``.
            FormatVersionError: written by an unknown format version.
            CorruptFileError: a file fails its checks.
        """
        path = Path(path)
        _read_manifest(path)  # a clear error before anything is created
        lock_fd = cls._lock(path)
        try:
            return cls._open_locked(path, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, path: Path, lock_fd: int) -> tuple["Store", Recovered]:
        manifest = _read_manifest(path)
        dim = manifest["dim"]
        kind = manifest.get("label_kind")
        snapshot = Columns.empty(dim)
        snap = manifest.get("snapshot")
        if snap:
            table, kind = _read_snapshot(path / snap["file"], snap, dim)
            snapshot = Columns.from_arrow(table, dim)
        records: list[Record] = []
        for name in manifest["wal"]:
            seg_kind, seg_records = _read_segment(path / name, dim)
            if seg_kind is not None:
                if kind is not None and seg_kind != kind:
                    raise CorruptFileError(f"{path / name}: labels are {seg_kind} but the memory's are {kind}")
                kind = seg_kind
            records.extend(seg_records)
        store = cls(path, manifest, lock_fd)
        store.manifest["label_kind"] = kind
        return store, Recovered(manifest, kind, snapshot, records)

    # -- WAL ----------------------------------------------------------------------
    def _next_name(self, stem: str, ext: str) -> str:
        self.manifest["generation"] += 1
        return f"{stem}-{self.manifest['generation']:06d}.{ext}"

    def begin(self) -> None:
        """Start appending: list a fresh WAL segment (after a successful open).

        Segments that were listed but never written to are dropped from the list.
        """
        self.manifest["wal"] = [n for n in self.manifest["wal"] if (self.path / n).exists()]
        self._start_segment()

    @property
    def segments(self) -> int:
        """How many WAL segments recovery would replay."""
        return len(self.manifest["wal"])

    def _start_segment(self) -> None:
        """List a new WAL segment in the manifest; its file is made at its first record."""
        self._close_segment()
        self.manifest["wal"] = self.manifest["wal"] + [self._next_name("wal", "arrows")]
        self._write_manifest()

    def _close_segment(self) -> None:
        if self._wal_writer is not None:
            self._wal_writer.close()
            self._wal_file.close()
        self._wal_writer = self._wal_file = None

    def log_add(self, slots: Columns, *, upsert: bool) -> None:
        """Append an add (or upsert) record and fsync it."""
        op = OP_UPSERT if upsert else OP_ADD
        kind = "str" if isinstance(slots.labels[0], str) else "int"
        if self.manifest["label_kind"] is None:
            self.manifest["label_kind"] = kind
        self._append(op, slots.arrays(self.manifest["dim"], kind), _crc(op, slots.ids, slots))

    def log_remove(self, ids) -> None:
        """Append a remove record and fsync it."""
        schema = wal_schema(self.manifest["dim"], self.manifest["label_kind"] or "int")
        cols = [pa.nulls(len(ids), f.type) for f in list(schema)[2:]]
        cols = [pa.array(np.asarray(ids, dtype=np.int64))] + cols
        self._append(OP_REMOVE, cols, _crc(OP_REMOVE, ids, None))

    def _append(self, op: int, cols: list[pa.Array], crc: int) -> None:
        dim, kind = self.manifest["dim"], self.manifest["label_kind"] or "int"
        schema = wal_schema(dim, kind)
        if self._wal_writer is None:
            self._wal_file = open(self.path / self.manifest["wal"][-1], "wb")
            self._wal_writer = pa.ipc.new_stream(self._wal_file, schema)
            _fsync_dir(self.path)  # the new file's directory entry survives a power loss too
        n = len(cols[0])
        batch = pa.record_batch([pa.array(np.full(n, op, np.int8))] + cols, schema=schema)
        self._seq += 1
        self._wal_writer.write_batch(batch, custom_metadata={"seq": str(self._seq), "crc32": str(crc)})
        self._wal_file.flush()
        os.fsync(self._wal_file.fileno())

    # -- snapshot -----------------------------------------------------------------
    def checkpoint(self, slots: Columns, extra: dict | None = None) -> None:
        """Write a snapshot of the whole slot table, start a fresh WAL and drop the old files.

        The new manifest is the commit point: a crash before it leaves the old
        snapshot and WAL in force, a crash after it the new ones.
        """
        kind = self.manifest["label_kind"] or "int"
        name = self._next_name("snapshot", "arrow")
        write_snapshot(self.path / name, self.manifest["dim"], kind, slots)
        old = [self.manifest["snapshot"]["file"]] if self.manifest["snapshot"] else []
        old += self.manifest["wal"]
        self._close_segment()
        self.manifest.update(extra or {})
        self.manifest["snapshot"] = {"file": name, "sha256": _sha256(self.path / name), "rows": int(len(slots.ids))}
        self.manifest["wal"] = []
        self._start_segment()
        for f in old:
            (self.path / f).unlink(missing_ok=True)

    def update(self, **fields) -> None:
        """Change config fields (temperature, next_id...) in the manifest, atomically."""
        self.manifest.update(fields)
        self._write_manifest()

    def _write_manifest(self) -> None:
        _write_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=2).encode())

    def close(self) -> None:
        """Close the WAL and release the directory's lock."""
        self._close_segment()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def write_snapshot(path: Path, dim: int, kind: str, slots: Columns) -> None:
    """Write the slot table as an Arrow IPC file, fsynced, via a temp file and rename."""
    schema = slot_schema(dim, kind).with_metadata({"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    table = pa.Table.from_arrays(slots.arrays(dim, kind), schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        with pa.ipc.new_file(f, schema) as writer:
            writer.write_table(table, max_chunksize=1 << 16)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.exists():
        raise FileNotFoundError(f"no memory at {path}: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{file}: not an engine memory manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatVersionError(f"{file}: format version {version!r}; this engine reads version {FORMAT_VERSION}")
    for key in ("dim", "metric", "temperature", "index", "wal", "generation"):
        if key not in manifest:
            raise CorruptFileError(f"{file}: the manifest lacks {key!r}")
    return manifest


def _read_snapshot(file: Path, entry: dict, dim: int) -> tuple[pa.Table, str]:
    if not file.exists():
        raise CorruptFileError(f"{file}: the snapshot named by the manifest is missing")
    digest = _sha256(file)
    if digest != entry.get("sha256"):
        raise CorruptFileError(f"{file}: checksum mismatch (sha256 {digest}, manifest says {entry.get('sha256')})")
    try:
        table = pa.ipc.open_file(file).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptFileError(f"{file}: unreadable Arrow file ({exc})") from exc
    kind = _check_schema(file, table.schema, dim, with_op=False)
    if table.num_rows != entry.get("rows"):
        raise CorruptFileError(f"{file}: {table.num_rows} rows, manifest says {entry.get('rows')}")
    return table, kind


def _check_schema(file: Path, schema: pa.Schema, dim: int, *, with_op: bool) -> str:
    for kind in ("int", "str"):
        expected = wal_schema(dim, kind) if with_op else slot_schema(dim, kind)
        if schema.remove_metadata().equals(expected):
            return kind
    raise CorruptFileError(f"{file}: unexpected schema {schema} for a memory of dim {dim}")


CONTINUATION = b"\xff\xff\xff\xff"  # every Arrow IPC message starts with it


def _is_torn(file: Path, offset: int, exc: Exception) -> bool:
    """Whether a read that failed at ``offset`` is a message cut short by the end of the file.

    A writer killed mid-append leaves a prefix of a well-formed message: it starts
    with the continuation marker and the reader ran out of bytes. Anything else
    (garbage where a message should start, a malformed header) is damage.
    """
    text = str(exc)
    short = "Expected to be able to read" in text or "only read" in text or "bytes available" in text
    with open(file, "rb") as f:
        f.seek(offset)
        head = f.read(4)
    return short and CONTINUATION.startswith(head)


def _read_segment(file: Path, dim: int) -> tuple[str | None, list[Record]]:
    """Replay one WAL segment; a torn final record is dropped, any other damage refused."""
    if not file.exists() or file.stat().st_size == 0:
        return None, []  # listed but never written to
    source = pa.OSFile(str(file))
    try:
        reader = pa.ipc.open_stream(source)
    except (pa.ArrowInvalid, OSError) as exc:
        if _is_torn(file, 0, exc):
            return None, []  # torn while writing the schema: no record was acknowledged
        raise CorruptFileError(f"{file}: unreadable WAL header ({exc})") from exc
    kind = _check_schema(file, reader.schema, dim, with_op=True)
    records = []
    while True:
        good_end = source.tell()
        try:
            batch, meta = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError) as exc:
            if _is_torn(file, good_end, exc):
                break  # torn final record: it was never acknowledged
            raise CorruptFileError(f"{file}: unreadable WAL record after {len(records)} good ones ({exc})") from exc
        records.append(_decode(file, batch, meta, dim, len(records)))
    return kind, records


def _decode(file: Path, batch: pa.RecordBatch, meta, dim: int, position: int) -> Record:
    ops = batch.column("op").to_numpy()
    if len(ops) == 0 or (ops != ops[0]).any() or ops[0] not in (OP_ADD, OP_UPSERT, OP_REMOVE):
        raise CorruptFileError(f"{file}: WAL record {position} has an invalid op column")
    op = int(ops[0])
    try:
        rec = Record(op, batch.column("id").to_numpy())
        if op != OP_REMOVE:
            rec.slots = Columns.from_arrow(batch, dim)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise CorruptFileError(f"{file}: WAL record {position} has unreadable columns ({exc})") from exc
    expected = dict(meta or {}).get(b"crc32")
    if expected is None or int(expected) != _crc(op, rec.ids, rec.slots):
        raise CorruptFileError(f"{file}: WAL record {position} fails its checksum")
    return rec
