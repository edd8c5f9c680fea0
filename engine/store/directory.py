"""Arrow persistence: snapshot + write-ahead log + manifest, and recovery.

A durable memory is a directory, locked (flock on the directory itself) by the
one process that may write it:

    manifest.json            format version, memory id, settings, the snapshot
                             (file, sha256, rows) and the log segments, with a
                             SHA-256 of its own canonical bytes
    snapshot-000007.arrow    Arrow IPC file: id, label, [weight], [used], vector or code (codec.py)
    wal-000008.arrows        write-ahead log segment (see :mod:`engine.store.wal`)

Durability is fail-stop. A write is acknowledged only once its record is fsynced
in the open segment, which the manifest on disk already lists. The manifest is
replaced atomically (temp file, fsync, rename, fsync of the directory), and it is
the only commit point: files are created and made durable before a manifest
names them, and deleted only after a manifest stops naming them. After an I/O
error the store either is exactly as before the failed call (a partial record is
truncated away, unlisted new files are removed) or, when it cannot know (a failed
fsync), refuses every later write with :class:`~engine.errors.MemoryFailedError`
until the memory is reopened.

Recovery checks everything: the manifest's checksum, each snapshot's sha256 and
row count, each closed segment's length, record count and CRC, every record's
CRC and sequence number. Only a torn tail of the last, open segment (a record
the writer was killed inside, never acknowledged) is dropped; any other damage
raises :class:`~engine.errors.CorruptFileError` naming the file. Nothing is
ever pickled, and a file name read from a manifest is only ever a plain name in
the memory's own directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import (
    CorruptFileError,
    MemoryExistsError,
    MemoryFailedError,
    MemoryLockedError,
    MemoryNotFoundError,
    MissingFileError,
    StorageError,
)
from . import fsio, wal
from .codec import Columns
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, manifest_bytes, read_manifest
from .snapshot import read_snapshot, write_snapshot

log = logging.getLogger(__name__)

_PROC_FD = Path("/proc/self/fd") if Path("/proc/self/fd").is_dir() else None
# Opening a memory whose log has more segments than this (one per open) checkpoints it.
MAX_SEGMENTS = 8
# Any of these in a directory means a memory (or the remains of one) lives there.
MEMORY_FILE = re.compile(r"(manifest\.json|LOCK|(snapshot-[0-9]+\.arrow|wal-[0-9]+\.arrows))(\.tmp)?")


@dataclass
class Recovered:
    """What :meth:`Store.open` read back: the memory's settings and its slots, to replay."""

    dim: int
    settings: dict
    label_kind: str | None
    snapshot: Columns
    records: list[wal.Record]
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def max_id(self) -> int:
        """The largest id any write recovered here carried (-1 if none)."""
        ids = [int(self.snapshot.ids.max())] if len(self.snapshot.ids) else []
        ids += [int(r.ids.max()) for r in self.records if r.slots is not None and len(r.ids)]
        return max(ids, default=-1)

    def replay(self) -> Iterator[tuple[np.ndarray, Columns | None]]:
        """The writes in order, as (ids to drop, slots to add or None): the snapshot first,
        then each logged add or upsert (which replaces its ids) and remove."""
        yield np.empty(0, np.int64), self.snapshot
        for rec in self.records:
            yield rec.ids, rec.slots


class Store:
    """The files of one durable memory. Owned by a :class:`~engine.memory.Memory`."""

    def __init__(self, path: Path, dir_fd: int, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.seq = manifest["seq"]  # the last sequence number written
        self._dir_fd = dir_fd
        self._writer: wal.SegmentWriter | None = None
        self._tail: wal.Scan | None = None  # the open segment as recovery found it
        self.failed: str | None = None  # why writes are refused, once they are

    # -- create / open ------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, settings: dict) -> Store:
        """Make a new memory directory with an empty log; ``settings`` are the owner's (JSON).

        Raises:
            MemoryExistsError: ``path`` holds memory files already (even without a manifest).
            MemoryLockedError: another writer holds ``path``.
            StorageError: the files could not be written; nothing is left behind.
        """
        path = Path(path).absolute()  # a later chdir must not move the memory
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fsio.storage_error(f"creating {path}", exc) from None
        _refuse_memory_files(path)  # before the lock: an open memory is "exists", not "locked"
        dir_fd = _lock(path)
        try:
            _refuse_memory_files(path)
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "memory_id": uuid.uuid4().hex,
                        "dim": dim, "settings": dict(settings), "label_kind": None, "snapshot": None, "wal": [],
                        "seq": 0, "generation": 0}
            store = cls(path, dir_fd, manifest)
            store._start(store.manifest)
        except BaseException:
            os.close(dir_fd)
            raise
        return store

    @classmethod
    def write_copy(cls, path: str | os.PathLike, dim: int, settings: dict, slots: Columns,
                   label_kind: str | None) -> None:
        """Make a new memory directory at ``path`` holding ``slots`` as its snapshot.

        Raises:
            MemoryExistsError, MemoryLockedError, StorageError: as :meth:`create`.
        """
        out = cls.create(path, dim, settings)
        try:
            out.checkpoint(slots, label_kind)
        finally:
            out.close()

    @classmethod
    def open(cls, path: str | os.PathLike, *, lock: bool = True) -> tuple[Store, Recovered]:
        """Read a memory directory back and check every file. Nothing is written.

        Call :meth:`begin` before logging new writes. With ``lock=False`` the directory is
        read without taking the writer's lock (a memory another process writes): what was
        acknowledged when the manifest was read is recovered, and a checkpoint that replaces
        the files meanwhile makes the read start over.

        Raises:
            FileNotFoundError: no memory at ``path``.
            MemoryLockedError: another writer holds ``path``.
            FormatVersionError: written by an unknown format version.
            CorruptFileError: a file is missing, short, extra or altered.
        """
        path = Path(path).absolute()
        if not (path / MANIFEST).is_file():
            raise MemoryNotFoundError(f"no memory at {path}: {MANIFEST} is missing")
        if not lock:
            for attempt in range(5):
                manifest = read_manifest(path)
                dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    store = cls(path, dir_fd, manifest)
                    return store, store._recover()
                except CorruptFileError:
                    os.close(dir_fd)
                    if attempt == 4 or read_manifest(path) == manifest:
                        raise  # damage, not a checkpoint that moved the files away meanwhile
                except BaseException:
                    os.close(dir_fd)
                    raise
        dir_fd = _lock(path)
        try:
            manifest = read_manifest(path)
            store = cls(path, dir_fd, manifest)
            recovered = store._recover()
            if not fsio.same_directory(path, dir_fd):  # what was read may be another directory's
                raise StorageError(f"{path} was moved or replaced while it was being opened; open it again", None)
            return store, recovered
        except BaseException:
            os.close(dir_fd)
            raise

    def _recover(self) -> Recovered:
        m, path = self.manifest, self.path
        kind = m["label_kind"]
        snapshot = Columns.empty(m["dim"])
        if m["snapshot"] is not None:
            snapshot = read_snapshot(path / m["snapshot"]["file"], m["snapshot"], m["dim"], kind)
        records: list[wal.Record] = []
        seq = m["seq"]
        for i, entry in enumerate(m["wal"]):
            last = i == len(m["wal"]) - 1
            sealed = entry if "records" in entry else None
            scan = wal.read_segment(path / entry["file"], dim=m["dim"], memory_id=m["memory_id"], prev_seq=seq,
                                    sealed=sealed, may_be_torn=last)
            for rec in scan.records:
                if rec.label_kind is not None:
                    if kind is not None and rec.label_kind != kind:
                        raise CorruptFileError(f"{path / entry['file']}: {rec.label_kind} labels in a memory "
                                               f"of {kind} labels")
                    kind = rec.label_kind
                    problem = rec.slots.check()
                    if problem:
                        raise CorruptFileError(f"{path / entry['file']}: a record holds {problem}")
                elif (rec.ids < 0).any():
                    raise CorruptFileError(f"{path / entry['file']}: a remove record holds negative ids")
            records.extend(scan.records)
            seq = scan.last_seq
            if last and sealed is None:
                self._tail = scan
        self.seq = seq
        self.manifest = {**m, "label_kind": kind}
        return Recovered(m["dim"], dict(m["settings"]), kind, snapshot, records, path)

    def start(self, *, read_only: bool) -> bool:
        """After a successful open: refuse writes (``read_only``, or a disk that refuses the new
        log segment), else :meth:`begin`. Returns whether the log has grown long enough
        (MAX_SEGMENTS) to be folded into a snapshot."""
        if read_only:
            self.fail("it was opened read-only")
            return False
        try:
            self.begin()  # from here on, writes go to a new log segment
        except StorageError as exc:
            self.fail(f"the log could not be reopened for writing ({exc})")
        return self.failed is None and self.segments > MAX_SEGMENTS

    def begin(self) -> None:
        """Start appending after a successful open: seal the open segment, list a new one.

        A torn tail is cut off the old segment first, so its sealed length is exact.

        Raises:
            StorageError: the new segment could not be listed (the memory then refuses writes).
        """
        wal_list = list(self.manifest["wal"])
        if self._tail is not None:
            name = wal_list[-1]["file"]
            if self._tail.torn:
                wal.truncate(self._held / name, self._tail.good_bytes)
            wal_list[-1] = {"file": name, "records": len(self._tail.records), "bytes": self._tail.good_bytes,
                            "crc32": self._tail.crc}
            self._tail = None
        self._start({**self.manifest, "wal": wal_list})

    def _start(self, manifest: dict) -> None:
        """Create a new open segment and commit ``manifest`` with it listed last."""
        name, generation = self._fresh_name("wal", "arrows", manifest["generation"])
        header = wal.segment_header(manifest["memory_id"], name, manifest["dim"])
        writer = wal.SegmentWriter.create(self._held, self._dir_fd, name, header, self.seq)
        new = {**manifest, "wal": manifest["wal"] + [{"file": name}], "generation": generation}
        try:
            self._commit(new)
        except StorageError as exc:
            writer.close()
            if not exc.uncertain:
                fsio.remove_quietly(self._held / name)
            raise
        if self._writer is not None:
            self._writer.close()
        self._writer = writer

    def _fresh_name(self, stem: str, ext: str, generation: int) -> tuple[str, int]:
        """The next file name no file in the directory has (orphans of a crash are skipped)."""
        while True:
            generation += 1
            name = f"{stem}-{generation:06d}.{ext}"
            if not (self._held / name).exists() and not (self._held / (name + ".tmp")).exists():
                return name, generation

    @property
    def segments(self) -> int:
        """How many log segments recovery would read."""
        return len(self.manifest["wal"])

    # -- writes -------------------------------------------------------------------
    @property
    def _held(self) -> Path:
        """The directory this store opened and locked, as the path every file it writes, renames,
        cuts or removes goes through: ``/proc/self/fd/N`` names the directory of the descriptor
        it holds wherever that directory is now, so no file operation can land in another
        directory put at :attr:`path` (between a check of :meth:`_check_home` and the
        operation, say). Where there is no /proc, :attr:`path`."""
        if self._dir_fd is not None and _PROC_FD is not None:
            return _PROC_FD / str(self._dir_fd)
        return self.path

    def _check_home(self) -> None:
        """Refuse every later write once the memory's path names another directory than the
        one it opened and locked (moved away, or replaced by another memory's directory, as
        a restore or deploy script does): its next manifest or snapshot would land in the
        other directory, beside another memory's files and outside this one's lock."""
        if self._dir_fd is not None and not fsio.same_directory(self.path, self._dir_fd):
            self.fail(f"its directory {self.path} was moved or replaced while the memory was open "
                      f"(its files stay in the directory it opened, wherever that is now)")

    def _refuse_if_failed(self) -> None:
        self._check_home()
        if self.failed is not None:
            raise MemoryFailedError(f"{self.path}: writes are refused since {self.failed}; reopen the memory "
                                    f"(every acknowledged write is on disk)", None, uncertain=False)

    def _check_writable(self) -> None:
        self._refuse_if_failed()
        if self._writer is None:
            raise MemoryFailedError(f"{self.path}: the memory is closed", None)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @contextlib.contextmanager
    def applying(self, what: str) -> Iterator[None]:
        """Around applying a write that is already durable: if applying it in memory fails, the
        files and the memory disagree, so every later write is refused until the memory is reopened."""
        try:
            yield
        except BaseException as exc:
            self.fail(f"the {what} is on disk but could not be applied in memory ({exc!r})")
            raise

    def fail(self, reason: str) -> None:
        """Refuse every later write (the files may no longer match what the memory holds)."""
        if self.failed is None:
            self.failed = reason

    def log_add(self, slots: Columns, label_kind: str | None, *, upsert: bool) -> None:
        """Append an add (or upsert) record and fsync it.

        Raises:
            StorageError: the record is not in the log (or, if ``uncertain``, may be).
        """
        self._check_writable()
        payload = wal.encode_add(slots, self.manifest["dim"], label_kind)
        self._append(wal.UPSERT if upsert else wal.ADD, label_kind, payload)

    def log_remove(self, ids: np.ndarray) -> None:
        """Append a remove record and fsync it (same errors as :meth:`log_add`)."""
        self._check_writable()
        self._append(wal.REMOVE, None, wal.encode_remove(ids))

    def _append(self, kind: int, label_kind: str | None, payload) -> None:
        data = wal.frame(kind, label_kind, self.seq + 1, payload)
        try:
            self._writer.append(data)
        except StorageError as exc:
            if exc.uncertain:
                self.fail(f"an I/O error made a log record uncertain ({exc})")
            raise
        self.seq += 1

    def checkpoint(self, slots: Columns, label_kind: str | None, settings: dict | None = None) -> None:
        """Write a snapshot of the whole slot table, start a fresh log and drop the old files.

        The new manifest is the commit point: a crash or an error before it leaves
        the old snapshot and log in force (and the store usable), after it the new ones.

        Raises:
            StorageError: nothing changed (or, if ``uncertain``, the store refuses writes).
        """
        self._check_writable()
        m = self.manifest
        name, generation = self._fresh_name("snapshot", "arrow", m["generation"])
        digest = write_snapshot(self._held, self._dir_fd, name, m["dim"], label_kind or "int", slots)
        old = ([m["snapshot"]["file"]] if m["snapshot"] else []) + [e["file"] for e in m["wal"]]
        new = {**m, "settings": {**m["settings"], **(settings or {})}, "label_kind": label_kind, "wal": [],
               "seq": self.seq, "generation": generation,
               "snapshot": {"file": name, "sha256": digest, "rows": int(len(slots.ids)), "seq": self.seq}}
        try:
            self._start(new)
        except StorageError as exc:
            if not exc.uncertain:
                fsio.remove_quietly(self._held / name)
            raise
        for f in old:  # no manifest names them any more
            fsio.remove_quietly(self._held / f)

    def update(self, **settings) -> None:
        """Change settings (temperature, ...) in the manifest, atomically.

        Raises:
            StorageError: nothing changed (or, if ``uncertain``, the store refuses writes).
        """
        self._check_writable()
        self._commit({**self.manifest, "settings": {**self.manifest["settings"], **settings}})

    def _commit(self, manifest: dict) -> None:
        self._refuse_if_failed()  # the manifest is written by path: only into the directory held
        try:
            fsio.write_atomic(self._dir_fd, self._held / MANIFEST, manifest_bytes(manifest))
        except StorageError as exc:
            if exc.uncertain:
                self.fail(f"an I/O error made the manifest uncertain ({exc})")
            raise
        self.manifest = manifest

    def close(self, settings: dict | None = None) -> None:
        """Seal the open segment in the manifest (when the disk allows) with any last
        ``settings``, and release the lock."""
        if self._writer is not None:
            if self.failed is None:
                entries = self.manifest["wal"][:-1] + [self._writer.describe()]
                merged = {**self.manifest["settings"], **(settings or {})}
                try:
                    self._commit({**self.manifest, "wal": entries, "settings": merged})
                except StorageError as exc:  # the segment stays open in the manifest: still exactly recoverable
                    log.warning("%s: the log segment is left open in the manifest (%s)", self.path, exc)
            self._writer.close()
            self._writer = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def holds_memory(path: Path) -> bool:
    """Whether ``path`` holds a memory (its manifest)."""
    return (Path(path) / MANIFEST).exists()


def _refuse_memory_files(path: Path) -> None:
    found = sorted(n for n in os.listdir(path) if MEMORY_FILE.fullmatch(n))
    if found:
        raise MemoryExistsError(f"{path} already holds a memory (files {', '.join(found[:4])}); open it with "
                                f"Memory.open({str(path)!r}), or create the new one in an empty directory")


def _lock(path: Path) -> int:
    try:
        fd = fsio.lock_dir(path)
    except NotADirectoryError:
        raise MissingFileError(f"no memory at {path}: not a directory") from None
    if fd is None:
        raise MemoryLockedError(f"{path} is already open (in this or another process); close it first")
    return fd
