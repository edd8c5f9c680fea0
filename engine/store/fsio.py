"""Durable file primitives: every byte the store writes goes through here.

One small seam for all disk I/O (write, fsync, rename, truncate), so that the
fault-injection tests can make any of them fail the way a full, read-only or
failing disk does, and so that each failure is classified once:

- :class:`~engine.errors.StorageError`: the operation failed and the files are
  as they were before it (a partial write was truncated away, a temp file was
  never renamed into place). The caller may go on.
- ``uncertain=True``: the operation failed at a point where the disk may hold
  either the old or the new state (a failed fsync, a rename whose directory
  entry could not be made durable). The store then refuses writes until the
  memory is reopened, as PostgreSQL does after a failed fsync.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from ..errors import StorageError

log = logging.getLogger(__name__)


def storage_error(what: str, exc: OSError, *, uncertain: bool = False) -> StorageError:
    """A StorageError for ``exc``, keeping its errno."""
    code = exc.errno if exc.errno is not None else errno.EIO
    name = errno.errorcode.get(code, str(code))
    return StorageError(f"{what}: {name} ({os.strerror(code)})", code, uncertain=uncertain)


def write_all(fd: int, data) -> None:
    """Write every byte of ``data`` at the file's offset (os.write may write fewer)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - a regular file never does this without raising
            raise OSError(errno.EIO, "short write")
        view = view[n:]


def fsync(fd: int) -> None:
    os.fsync(fd)


def rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def truncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)


def fsync_dir(dir_fd: int) -> None:
    """Make directory entries (created, renamed, removed files) durable."""
    os.fsync(dir_fd)


def lock_dir(path: Path) -> int | None:
    """Open ``path`` and take an exclusive flock on the directory itself.

    Locking the directory, not a file in it, means no file operation inside
    the directory (deleting a lock file, say) can let a second writer in. The
    kernel drops the lock when the process dies.

    Returns:
        The directory's fd (kept open while the lock is held), or None if another
        open file description holds the lock.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def create_exclusive(path: Path) -> int:
    """Create a new file for writing; FileExistsError if it is there already."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


def write_atomic(dir_fd: int, path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory.

    Raises:
        StorageError: with ``uncertain=False`` when the old file is still in force
            (the failure came before the rename), ``uncertain=True`` when the rename
            happened but could not be made durable.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            fsync(fd)
        finally:
            os.close(fd)
        rename(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise storage_error(f"writing {path.name}", exc) from None
    try:
        fsync_dir(dir_fd)
    except OSError as exc:
        raise storage_error(f"making {path.name} durable", exc, uncertain=True) from None


def remove_quietly(path: Path) -> None:
    """Unlink a file we own if it is there; a failure leaves an orphan, never damage."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s could not be removed (%s); it is left over, never read", path, exc.strerror)


def same_directory(path: Path, dir_fd: int) -> bool:
    """Whether ``path`` still names the directory open as ``dir_fd`` (not moved away, nor
    replaced by another directory moved to its path)."""
    try:
        here, held = os.stat(path), os.fstat(dir_fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


class FdSink:
    """A minimal writable file object over an fd, for pyarrow writers (all bytes via write_all)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.closed = False

    def write(self, data) -> int:
        write_all(self.fd, data)
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass
