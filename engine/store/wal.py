"""The write-ahead log: segments of checksummed frames, each holding one Arrow IPC message.

A segment is a sequence of frames (little-endian):

    header   28 bytes: magic b"EWAL", kind u8, label kind u8, 2 zero bytes,
             seq u64, payload length u64, CRC32 of the 24 bytes before it
    payload  an Arrow IPC record batch message (or JSON for the segment header)
    trailer  4 bytes: CRC32 of header + payload

Arrow IPC has no checksums, so each record is framed: the trailer's CRC covers
the whole framed message (header, Arrow metadata and body), and the header has
its own CRC so a damaged length is never mistaken for a record cut short. No
length read from a file is trusted before it is checked against the bytes that
are actually there, and no payload is parsed by Arrow before its CRC passes.

The first frame of every segment (kind SEGMENT) names the memory, the segment's
own file name and the dimension; its ``seq`` is the last sequence number before
the segment. Records (ADD, UPSERT, REMOVE) number on from there, one apart, across
segments. The file is created, its header fsynced, and only then listed in the
manifest, so a listed segment always holds at least its header frame.

Only the last segment of a memory is ever open for appends. A record cut short by
the end of that segment is a torn write (the writer died inside it, before it was
acknowledged) and is the only damage recovery may drop; everything else (a bad
CRC, a wrong sequence number, a cut inside a sealed segment) raises
:class:`~engine.errors.CorruptFileError` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import CorruptFileError, InvalidValueError
from . import fsio
from .codec import Columns, slot_schema

MAGIC = b"EWAL"
_HEAD = struct.Struct("<4sBBHQQ")  # magic, kind, label kind, zero, seq, payload length
_U32 = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _U32.size  # 28
FRAME_OVERHEAD = HEADER_SIZE + _U32.size

SEGMENT, ADD, UPSERT, REMOVE = 0, 1, 2, 3
KINDS = (SEGMENT, ADD, UPSERT, REMOVE)
LABEL_CODES = {None: 0, "int": 1, "str": 2}
LABEL_KINDS = {v: k for k, v in LABEL_CODES.items()}
REMOVE_SCHEMA = pa.schema([pa.field("id", pa.int64(), nullable=False)])


@dataclass
class Record:
    """One replayed operation: ``slots`` for an add or upsert, ``ids`` alone for a remove."""

    kind: int
    seq: int
    ids: np.ndarray
    slots: Columns | None = None
    label_kind: str | None = None


@dataclass
class Scan:
    """What reading one segment found."""

    records: list[Record] = field(default_factory=list)
    good_bytes: int = 0  # bytes of whole frames
    crc: int = 0  # CRC32 of those bytes
    last_seq: int = 0
    torn: bool = False  # a cut-short record followed the whole frames


def frame(kind: int, label_kind: str | None, seq: int, payload) -> bytes:
    """One framed record."""
    head = _HEAD.pack(MAGIC, kind, LABEL_CODES[label_kind], 0, seq, memoryview(payload).nbytes)
    header = head + _U32.pack(zlib.crc32(head))
    return b"".join((header, payload, _U32.pack(zlib.crc32(payload, zlib.crc32(header)))))


def encode_add(slots: Columns, dim: int, label_kind: str) -> pa.Buffer:
    return pa.record_batch(slots.arrays(dim, label_kind), schema=slot_schema(dim, label_kind)).serialize()


def encode_remove(ids: np.ndarray) -> pa.Buffer:
    return pa.record_batch([pa.array(np.asarray(ids, dtype=np.int64))], schema=REMOVE_SCHEMA).serialize()


def segment_header(memory_id: str, name: str, dim: int) -> bytes:
    return json.dumps({"format": "engine-wal", "memory": memory_id, "segment": name, "dim": dim},
                      sort_keys=True).encode()


class SegmentWriter:
    """Appends frames to one segment file, fsyncing each before it returns.

    A failed write is truncated away (the file is as before it) and reported as a
    plain :class:`StorageError`; a failed fsync or truncation is reported with
    ``uncertain=True``: the caller must stop writing until it reopens.
    """

    def __init__(self, fd: int, name: str, size: int, crc: int, records: int):
        self.fd, self.name, self.size, self.crc, self.records = fd, name, size, crc, records

    @classmethod
    def create(cls, directory: Path, dir_fd: int, name: str, header: bytes, prev_seq: int) -> SegmentWriter:
        """Make a new segment holding only its header frame, durable (file and directory entry).

        Raises:
            StorageError: the file could not be made; nothing is left behind.
        """
        path = directory / name
        data = frame(SEGMENT, None, prev_seq, header)
        fd = -1
        try:
            fd = fsio.create_exclusive(path)
            fsio.write_all(fd, data)
            fsio.fsync(fd)
            fsio.fsync_dir(dir_fd)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
                fsio.remove_quietly(path)
            raise fsio.storage_error(f"creating log segment {name}", exc) from None
        return cls(fd, name, len(data), zlib.crc32(data), 0)

    def append(self, data: bytes) -> None:
        """Append one framed record and make it durable."""
        try:
            fsio.write_all(self.fd, data)
        except OSError as exc:
            self._undo(exc)
        try:
            fsio.fsync(self.fd)
        except OSError as exc:
            raise fsio.storage_error(f"making a record in {self.name} durable", exc, uncertain=True) from None
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)
        self.records += 1

    def _undo(self, exc: OSError) -> None:
        """Cut a partly written record off the end, so the next append starts on a frame boundary."""
        try:
            fsio.truncate(self.fd, self.size)
            os.lseek(self.fd, self.size, os.SEEK_SET)
            fsio.fsync(self.fd)
        except OSError:
            raise fsio.storage_error(f"appending to {self.name} (and truncating the partial record)",
                                     exc, uncertain=True) from None
        raise fsio.storage_error(f"appending to {self.name}", exc) from None

    def describe(self) -> dict:
        """The manifest entry of this segment once sealed."""
        return {"file": self.name, "records": self.records, "bytes": self.size, "crc32": self.crc}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def truncate(path: Path, size: int) -> None:
    """Cut a torn tail off a segment, durably.

    Raises:
        StorageError: uncertain (the file may or may not be cut).
    """
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            fsio.truncate(fd, size)
            fsio.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise fsio.storage_error(f"cutting the torn tail of {path.name}", exc, uncertain=True) from None


def read_segment(file: Path, *, dim: int, memory_id: str, prev_seq: int, sealed: dict | None,
                 may_be_torn: bool) -> Scan:
    """Read and check every frame of one segment.

    Args:
        file: the segment.
        dim: the memory's dimension.
        memory_id: the memory the segment must belong to.
        prev_seq: the last sequence number before this segment.
        sealed: the manifest's description of a closed segment (records, bytes, crc32), or None.
        may_be_torn: whether a record cut short at the end is a torn write (the last, open
            segment) rather than damage.

    Raises:
        CorruptFileError: anything missing, short, extra or altered.
    """
    try:
        f = open(file, "rb")
    except FileNotFoundError:
        raise CorruptFileError(f"{file}: a log segment listed in the manifest is missing") from None
    except OSError as exc:
        raise CorruptFileError(f"{file}: cannot read the log segment ({exc.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if sealed is not None and size != sealed["bytes"]:
            raise CorruptFileError(f"{file}: {size} bytes, but the manifest says the closed segment has "
                                   f"{sealed['bytes']}")
        scan = Scan(last_seq=prev_seq)
        while scan.good_bytes < size:
            got = _read_frame(f, file, size - scan.good_bytes, len(scan.records), scan.good_bytes == 0,
                              may_be_torn and sealed is None)
            if got is None:
                scan.torn = True
                break
            kind, lk, seq, payload, raw = got
            if scan.good_bytes == 0:
                _check_header(file, kind, payload, memory_id, dim, seq, prev_seq)
            else:
                if kind == SEGMENT:
                    raise CorruptFileError(f"{file}: a second segment header after record {len(scan.records)}")
                if seq != scan.last_seq + 1:
                    raise CorruptFileError(f"{file}: record {len(scan.records)} has sequence number {seq}, "
                                           f"expected {scan.last_seq + 1} (a record is missing or out of place)")
                scan.records.append(_decode(file, kind, lk, seq, payload, dim, len(scan.records)))
                scan.last_seq = seq
            scan.good_bytes += FRAME_OVERHEAD + len(payload)
            scan.crc = zlib.crc32(raw[2], zlib.crc32(payload, zlib.crc32(raw[0], scan.crc)))
        if scan.good_bytes == 0:
            raise CorruptFileError(f"{file}: the log segment is empty (its header frame is missing)")
        if sealed is not None and (len(scan.records) != sealed["records"] or scan.crc != sealed["crc32"]):
            raise CorruptFileError(f"{file}: {len(scan.records)} records (CRC32 {scan.crc}), but the manifest "
                                   f"says {sealed['records']} (CRC32 {sealed['crc32']})")
    return scan


def _read_frame(f, file: Path, remaining: int, position: int, is_header: bool, may_be_torn: bool):
    """The next frame as (kind, label code, seq, payload, (header, _, trailer)), None for a torn tail."""
    what = "the segment header" if is_header else f"record {position}"

    def short(detail: str):
        if may_be_torn and not is_header:
            return None
        raise CorruptFileError(f"{file}: cut short inside {what} ({detail})")

    head_bytes = f.read(min(remaining, HEADER_SIZE))
    if len(head_bytes) < HEADER_SIZE:
        if head_bytes[:4] != MAGIC[: len(head_bytes[:4])]:
            raise CorruptFileError(f"{file}: {len(head_bytes)} stray bytes where {what} should start")
        return short(f"{len(head_bytes)} of {HEADER_SIZE} header bytes")
    head, (head_crc,) = head_bytes[: _HEAD.size], _U32.unpack(head_bytes[_HEAD.size:])
    magic, kind, lk, zero, seq, length = _HEAD.unpack(head)
    if magic != MAGIC or zlib.crc32(head) != head_crc:
        raise CorruptFileError(f"{file}: {what} has a damaged header (checksum or magic)")
    if kind not in KINDS or lk not in LABEL_KINDS or zero != 0:
        raise CorruptFileError(f"{file}: {what} has an invalid header (kind {kind}, label kind {lk})")
    if length > remaining - FRAME_OVERHEAD:  # checked before anything is allocated for it
        return short(f"{length} payload bytes announced, {max(0, remaining - FRAME_OVERHEAD)} there")
    payload = f.read(length)
    trailer = f.read(_U32.size)
    if len(payload) != length or len(trailer) != _U32.size:  # the file shrank while we read it
        raise CorruptFileError(f"{file}: {what} changed while it was read")
    if _U32.unpack(trailer)[0] != zlib.crc32(payload, zlib.crc32(head_bytes)):
        raise CorruptFileError(f"{file}: {what} fails its checksum")
    return kind, lk, seq, payload, (head_bytes, None, trailer)


def _check_header(file: Path, kind: int, payload: bytes, memory_id: str, dim: int, seq: int, prev_seq: int):
    if kind != SEGMENT:
        raise CorruptFileError(f"{file}: does not start with a segment header")
    try:
        doc = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptFileError(f"{file}: unreadable segment header") from None
    want = {"format": "engine-wal", "memory": memory_id, "segment": file.name, "dim": dim}
    if doc != want:
        raise CorruptFileError(f"{file}: the segment header says {doc}, expected {want} "
                               f"(a file of another memory, or renamed)")
    if seq != prev_seq:
        raise CorruptFileError(f"{file}: the segment follows sequence number {seq}, expected {prev_seq} "
                               f"(a segment is missing or out of place)")


def _decode(file: Path, kind: int, lk: int, seq: int, payload: bytes, dim: int, position: int) -> Record:
    label_kind = LABEL_KINDS[lk]
    try:
        if kind == REMOVE:
            if label_kind is not None:
                raise InvalidValueError("a remove record with a label kind")
            batch = pa.ipc.read_record_batch(pa.py_buffer(payload), REMOVE_SCHEMA)
            rec = Record(kind, seq, batch.column(0).to_numpy())
        else:
            if label_kind is None:
                raise InvalidValueError("an add record without a label kind")
            batch = pa.ipc.read_record_batch(pa.py_buffer(payload), slot_schema(dim, label_kind))
            slots = Columns.from_arrow(batch, dim)
            rec = Record(kind, seq, slots.ids, slots, label_kind)
        if batch.num_rows == 0:
            raise InvalidValueError("a record without rows")
    except (pa.ArrowException, ValueError, TypeError, IndexError, KeyError) as exc:
        raise CorruptFileError(f"{file}: record {position} is unreadable ({exc})") from None
    return rec

