"""The files of one checkpoint directory: write them durably, read them back verified.

Layout of a checkpoint directory:
    tensors.bin    the raw bytes of every array, one after the other
    state.json     the state's skeleton and, for each array, dtype/shape/offset
    MANIFEST.json  written last: size and xxh3-128 checksum of both files, step,
                   reason, metrics. Its presence marks the checkpoint complete.

Capture (`Snapshot.capture`) is apart from writing (`write_checkpoint_files`)
so that a writer can run in the background after an in-memory snapshot.
"""

from __future__ import annotations

import io
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from ..fsutil import EarlyWriteback, create_file, open_regular, read_regular
from .layout import (
    CHECKSUM,
    DATA_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    STATE_FILE,
    CorruptCheckpointError,
    sign_manifest,
)
from .tree import (
    Array,
    ArraySpec,
    HostStaging,
    array_bytes,
    array_spec,
    check_layout,
    empty_array,
    flatten,
    unflatten,
)

WRITEBACK_EVERY = 64 << 20  # the disk starts writing each 64 MB of tensors.bin once it is written


@dataclass
class Snapshot:
    """A state split into a JSON skeleton and host arrays, ready to be written."""

    skeleton: Any
    arrays: list[Array]
    staging: HostStaging | None = None

    @classmethod
    def capture(cls, tree: Any, staging: HostStaging | None = None, later: frozenset[int] = frozenset()) -> Snapshot:
        """With `staging`, every array is copied into its host buffers, so training may go on while
        this snapshot is written (until the next capture into the same staging); the CPU tensors
        whose data_ptr() is in `later` only by finish_staging(), which must run before they change, and
        changed_since_capture() must then find them unchanged."""
        skeleton, arrays = flatten(tree, staging, later)
        return cls(skeleton, arrays, staging)

    def finish_staging(self) -> None:
        """The copies capture() left for later (see HostStaging.copy_later)."""
        if self.staging is not None:
            self.staging.copy_later()

    def changed_since_capture(self) -> list[str]:
        """What was left for later and changed in place since the capture (see HostStaging)."""
        return self.staging.changed_since_capture() if self.staging is not None else []

    @property
    def nbytes(self) -> int:
        return sum(array_bytes(a).nbytes for a in self.arrays)


def write_checkpoint_files(directory: Path, snapshot: Snapshot, meta: dict, shards: dict | None = None) -> dict:
    """Write and fsync the data, the state and, last, the manifest into an existing directory.

    `shards`: files other ranks (and DCP) wrote there already, with the size and checksum their
    writer computed; the manifest lists them too. Returns the manifest. Raises OSError (ENOSPC
    included) with nothing marked complete.
    """
    if snapshot.staging is not None:
        snapshot.staging.wait()  # device-to-host copies done
    specs: list[dict] = []
    data_hash = xxhash.xxh3_128()
    offset = 0
    with create_file(directory / DATA_FILE) as f:
        writeback = EarlyWriteback(f.fileno(), WRITEBACK_EVERY)
        for array in snapshot.arrays:
            view = array_bytes(array)
            specs.append(array_spec(array, offset).to_json())
            for begin in range(0, view.nbytes, writeback.every):  # the disk starts on a range once it is written
                part = view[begin : begin + writeback.every]
                data_hash.update(part)
                f.write(part)
                offset += part.nbytes
                if offset - writeback.started >= writeback.every:
                    f.flush()
                    writeback.written(offset)
        f.flush()
        os.fsync(f.fileno())
    state = json.dumps({"format": FORMAT_VERSION, "skeleton": snapshot.skeleton, "arrays": specs}).encode()
    write_durably(directory / STATE_FILE, state)
    manifest = sign_manifest(
        {
            "format": FORMAT_VERSION,
            **meta,
            "created": time.time(),
            "files": {
                DATA_FILE: {"size": offset, CHECKSUM: data_hash.hexdigest()},
                STATE_FILE: {"size": len(state), CHECKSUM: xxhash.xxh3_128_hexdigest(state)},
                **(shards or {}),
            },
        }
    )
    write_durably(directory / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    return manifest


def write_durably(path: Path, data: bytes) -> None:
    with create_file(path) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint_files(directory: Path, manifest: dict, verify_shards: bool = True) -> Any:
    """Read and verify sizes and checksums; decode and check the whole tree before returning it.
    Raises CorruptCheckpointError.

    Only regular files inside `directory` are read, and no more bytes than the manifest lists. The
    files of sharded state are verified too (read once, hashed) unless `verify_shards` is false:
    another rank verified them already.
    """
    files = manifest["files"]
    for name, entry in files.items():
        size = _regular_size(directory / name)
        if size != entry["size"]:
            found = "missing" if size is None else f"{size} bytes"
            raise CorruptCheckpointError(f"{name} is {found}, the manifest says {entry['size']} bytes (truncated?)")
    if verify_shards:
        for name, entry in files.items():
            if name not in (DATA_FILE, STATE_FILE) and _file_checksum(directory / name) != entry[CHECKSUM]:
                raise CorruptCheckpointError(f"{name} does not match its checksum")
    state = _read(directory / STATE_FILE, files[STATE_FILE]["size"])
    if xxhash.xxh3_128_hexdigest(state) != files[STATE_FILE][CHECKSUM]:
        raise CorruptCheckpointError(f"{STATE_FILE} does not match its checksum")
    try:
        parsed = json.loads(state)
        specs = [ArraySpec.from_json(s) for s in parsed["arrays"]]
        skeleton = parsed["skeleton"]
        check_layout(specs, files[DATA_FILE]["size"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{STATE_FILE} cannot be parsed ({_short(e)})") from None
    arrays = _read_arrays(directory / DATA_FILE, specs, files[DATA_FILE][CHECKSUM])
    try:
        return unflatten(skeleton, arrays)
    except (ValueError, TypeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{STATE_FILE} does not decode ({_short(e)})") from None


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


def _read_arrays(path: Path, specs: list[ArraySpec], checksum: str) -> list[Array]:
    """The arrays of `specs` (checked by `check_layout` against the file's verified size)."""
    data_hash = xxhash.xxh3_128()
    arrays: list[Array] = []
    f = _open(path)
    with f:
        _read_ahead(f.fileno())
        for spec in specs:
            try:
                array, view = empty_array(spec)
            except (ValueError, TypeError, RuntimeError, MemoryError) as e:  # e.g. more dimensions than allowed
                raise CorruptCheckpointError(f"{STATE_FILE}: an array cannot be made ({_short(e)})") from None
            _read_exactly(f, view)
            data_hash.update(view)
            arrays.append(array)
    if data_hash.hexdigest() != checksum:
        raise CorruptCheckpointError(f"{DATA_FILE} does not match its checksum")
    return arrays


def _read_ahead(fd: int) -> None:
    """Ask the kernel to read the whole file ahead, in the background (a cold load then overlaps the
    disk with the checksum and the page faults of fresh memory); a hint, ignored where unsupported."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


def _read_exactly(f, view: memoryview) -> None:
    done = 0
    while done < view.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise CorruptCheckpointError(f"{DATA_FILE} ended early")
        done += n


def _open(path: Path) -> io.BufferedReader:
    try:
        return open_regular(path)[0]
    except OSError as e:
        raise CorruptCheckpointError(f"{path.name} cannot be read ({e.strerror or e})") from None


def _read(path: Path, size: int) -> bytes:
    try:
        return read_regular(path, size)
    except OSError as e:
        raise CorruptCheckpointError(f"{path.name} cannot be read ({e.strerror or e})") from None


def _file_checksum(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with _open(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _regular_size(path: Path) -> int | None:
    """The size of a regular file; None if missing; CorruptCheckpointError if something else stands there."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CorruptCheckpointError(f"{path.name} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CorruptCheckpointError(f"{path.name} is not a regular file")
    return st.st_size
