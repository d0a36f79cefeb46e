"""File-system primitives: fsync of files and directories, atomic small-file writes, and reads
that open only regular files (no symlink, FIFO or device can stand in for a file we wrote)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import io
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


class NotRegularFileError(OSError):
    """A path that should be a file we wrote is a symlink, a directory, a FIFO, a device, or too large."""


def open_regular_fd(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open() that only ever opens a regular file: never through a symlink (whose target could be
    any file), never blocking on a FIFO. Raises NotRegularFileError for anything else."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            raise NotRegularFileError(f"{path.name} is a symlink") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO without a reader; a directory
            raise NotRegularFileError(f"{path.name} is not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(f"{path.name} is not a regular file")
    return fd


def open_regular(path: Path) -> tuple[io.BufferedReader, int]:
    """Open a regular file for reading (see open_regular_fd); (file, size).

    Raises FileNotFoundError if there is nothing, NotRegularFileError if it is not a regular file.
    """
    fd = open_regular_fd(path, os.O_RDONLY)
    return os.fdopen(fd, "rb"), os.fstat(fd).st_size


def read_regular(path: Path, max_size: int) -> bytes:
    """The contents of a regular file of at most `max_size` bytes (NotRegularFileError otherwise)."""
    f, size = open_regular(path)
    with f:
        if size > max_size:
            raise NotRegularFileError(f"{path.name} is {size} bytes, more than the {max_size} expected")
        data = f.read(max_size + 1)
    if len(data) > max_size:  # grew while read
        raise NotRegularFileError(f"{path.name} is larger than the {max_size} bytes expected")
    return data


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_file(path: Path, mode: int = 0o666) -> io.BufferedWriter:
    """A new regular file, opened for writing: never an existing name, so never through a symlink
    someone planted there (O_CREAT|O_EXCL|O_NOFOLLOW). FileExistsError if the name is taken."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode), "wb")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one.

    The temporary file has an unpredictable name and is created exclusively (mkstemp), so that another
    user of a shared directory cannot plant a link at its name; the rename replaces `path` itself,
    never a file a link there points to."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())  # mkstemp's 0600: as open() would have made it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def umask() -> int:
    """This process's umask, read without changing it (os.umask sets it: racy beside other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def disk_full_hint(e: OSError) -> str:
    return " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""


def append_line_durably(path: Path, line: str) -> None:
    """Append one line and fsync, so a log entry survives a SIGKILL right after."""
    with open_append(path) as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def open_append(path: Path, buffering: int = -1) -> io.TextIOWrapper:
    """A regular file opened for appending text (created if missing; see open_regular_fd)."""
    fd = open_regular_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return open(fd, "a", encoding="utf-8", buffering=buffering)


class EarlyWriteback:
    """Starts the disk writes of a file being written, range by range, while the rest is still being
    written (Linux's sync_file_range(SYNC_FILE_RANGE_WRITE), asynchronous): the final fsync then
    waits for what is left instead of for the whole file, so copying into the page cache and
    writing to the disk overlap. Elsewhere, or where the call fails, it does nothing (fsync alone).
    `written(end)` after each write: every `every` bytes the range written since the last call is
    started."""

    _SYNC_FILE_RANGE_WRITE = 2

    def __init__(self, fd: int, every: int) -> None:
        self.fd, self.every, self.started = fd, every, 0
        self._call = _sync_file_range()

    def written(self, end: int) -> None:
        """Bytes up to `end` are written (flushed to the kernel)."""
        if self._call is None or end - self.started < self.every:
            return
        if self._call(self.fd, self.started, end - self.started, self._SYNC_FILE_RANGE_WRITE) != 0:
            self._call = None  # not supported by this file system: fsync alone
        self.started = end


@functools.cache
def _sync_file_range() -> Any:
    """libc's sync_file_range, found in the process's own symbols (the C library is loaded already):
    ctypes.util.find_library would run ldconfig in a subprocess, from the writer thread, and a
    DataLoader worker forked meanwhile keeps that subprocess's pipe open: the thread waits forever."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call
