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

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from .layout import CHECKSUM, DATA_FILE, FORMAT_VERSION, MANIFEST_FILE, STATE_FILE, CorruptCheckpointError
from .tree import Array, ArraySpec, HostStaging, array_bytes, array_spec, empty_array, flatten, unflatten


@dataclass
class Snapshot:
    """A state split into a JSON skeleton and host arrays, ready to be written."""

    skeleton: Any
    arrays: list[Array]
    staging: HostStaging | None = None

    @classmethod
    def capture(cls, tree: Any, staging: HostStaging | None = None) -> Snapshot:
        """With `staging`, every array is copied into its host buffers, so training may go on while
        this snapshot is written (until the next capture into the same staging)."""
        skeleton, arrays = flatten(tree, staging)
        return cls(skeleton, arrays, staging)

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
    with open(directory / DATA_FILE, "wb") as f:
        for array in snapshot.arrays:
            view = array_bytes(array)
            specs.append(array_spec(array, offset).to_json())
            data_hash.update(view)
            f.write(view)
            offset += view.nbytes
        f.flush()
        os.fsync(f.fileno())
    state = json.dumps({"format": FORMAT_VERSION, "skeleton": snapshot.skeleton, "arrays": specs}).encode()
    write_durably(directory / STATE_FILE, state)
    manifest = {
        "format": FORMAT_VERSION,
        **meta,
        "created": time.time(),
        "files": {
            DATA_FILE: {"size": offset, CHECKSUM: data_hash.hexdigest()},
            STATE_FILE: {"size": len(state), CHECKSUM: xxhash.xxh3_128_hexdigest(state)},
            **(shards or {}),
        },
    }
    write_durably(directory / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    return manifest


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint_files(directory: Path, manifest: dict, verify_shards: bool = True) -> Any:
    """Read and verify sizes and checksums; return the state tree. Raises CorruptCheckpointError.

    The files of sharded state are verified too (read once, hashed) unless `verify_shards` is
    false: another rank verified them already.
    """
    files = manifest["files"]
    for name, entry in files.items():
        size = _size_or_none(directory / name)
        if size != entry["size"]:
            found = "missing" if size is None else f"{size} bytes"
            raise CorruptCheckpointError(f"{name} is {found}, the manifest says {entry['size']} bytes (truncated?)")
    if verify_shards:
        for name, entry in files.items():
            if name not in (DATA_FILE, STATE_FILE) and _file_checksum(directory / name) != entry[CHECKSUM]:
                raise CorruptCheckpointError(f"{name} does not match its checksum")
    state = (directory / STATE_FILE).read_bytes()
    if xxhash.xxh3_128_hexdigest(state) != files[STATE_FILE][CHECKSUM]:
        raise CorruptCheckpointError(f"{STATE_FILE} does not match its checksum")
    try:
        parsed = json.loads(state)
        specs = [ArraySpec.from_json(s) for s in parsed["arrays"]]
        skeleton = parsed["skeleton"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{STATE_FILE} cannot be parsed ({e})") from None
    arrays = _read_arrays(directory / DATA_FILE, specs, files[DATA_FILE][CHECKSUM])
    return unflatten(skeleton, arrays)


def _read_arrays(path: Path, specs: list[ArraySpec], checksum: str) -> list[Array]:
    data_hash = xxhash.xxh3_128()
    arrays: list[Array] = []
    with open(path, "rb", buffering=0) as f:
        position = 0
        for spec in specs:
            if spec.offset != position:
                raise CorruptCheckpointError(f"array layout in {STATE_FILE} is not contiguous")
            try:
                array, view = empty_array(spec)
            except (ValueError, TypeError, RuntimeError) as e:
                raise CorruptCheckpointError(f"bad array description in {STATE_FILE} ({e})") from None
            if view.nbytes != spec.nbytes:
                raise CorruptCheckpointError(f"array size mismatch in {STATE_FILE}")
            _read_exactly(f, view)
            data_hash.update(view)
            arrays.append(array)
            position += spec.nbytes
    if data_hash.hexdigest() != checksum:
        raise CorruptCheckpointError(f"{DATA_FILE} does not match its checksum")
    return arrays


def _read_exactly(f, view: memoryview) -> None:
    done = 0
    while done < view.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise CorruptCheckpointError(f"{DATA_FILE} ended early")
        done += n


def _file_checksum(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
