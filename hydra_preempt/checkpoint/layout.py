"""The layout of a checkpoint directory and the reading of manifests: no torch, nothing written.

    checkpoints/
      step-000000100/          one complete checkpoint: tensors.bin, state.json, and
        MANIFEST.json          written last; its presence marks the checkpoint complete
      index.json               latest and best-N (see store.py)

What `hydra-preempt status` and the sweep state need (the newest complete
checkpoint of a run) is read here, so that they never import torch.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ..fsutil import read_regular
from .retention import CheckpointRecord

log = logging.getLogger("hydra_preempt.checkpoint")

FORMAT_VERSION = 2  # 2: the manifest carries its own checksum; 1 (without it) is still read
DATA_FILE = "tensors.bin"
STATE_FILE = "state.json"
MANIFEST_FILE = "MANIFEST.json"
CHECKSUM = "xxh3_128"
SHARDS_METADATA = "shards.json"  # sharded state (sharded.py): DCP's metadata as JSON, beside shard-NNNNN.bin
SHARD_FILE = re.compile(r"shard-\d{5}\.bin")  # fullmatch
REASONS = ("periodic", "preempt", "manual", "emergency", "final")
MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists one file per rank: far below this even at 100k ranks
_HEX128 = re.compile(r"[0-9a-f]{32}")
_MAX_STEP = 10**15


FINAL_DIR = re.compile(r"step-(\d{9,})")  # fullmatch


class CorruptCheckpointError(Exception):
    """A checkpoint directory is incomplete or its contents do not match its manifest."""


class ShardedFormatError(ValueError):
    """The sharded part of a checkpoint does not decode or does not agree with its files (its checksums
    may still verify). Here, not beside the sharded format (shard_layout.py), so that catching it needs
    no import of torch.distributed.checkpoint, which only a sharded run loads (importing it with DTensor
    costs ~0.6 CPU-s in a process without an optimizer: a sweep's launcher, a CLI)."""


@dataclass(frozen=True)
class CheckpointInfo(CheckpointRecord):
    path: Path = field(default=Path("."), compare=False)
    created: float = 0.0
    nbytes: int = 0
    sharded: tuple[str, ...] = ()  # objects whose state is sharded (sharded.py), written by every rank
    # per GPU of the writing process (gpumetrics.GpuSummary): its figures up to this checkpoint
    gpus: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def sign_manifest(manifest: dict) -> dict:
    """The manifest with its own checksum, over a canonical form of everything else in it."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    return {**body, CHECKSUM: xxhash.xxh3_128_hexdigest(_canonical(body))}


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def read_manifest(directory: Path) -> dict:
    """The verified manifest of a checkpoint directory (see `verify_manifest`). Raises CorruptCheckpointError.

    Only a regular file is read (not a symlink, FIFO or device), and at most MAX_MANIFEST_BYTES of it.
    """
    try:
        data = read_regular(directory / MANIFEST_FILE, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise CorruptCheckpointError("no MANIFEST.json (the save did not finish)") from None
    except OSError as e:
        raise CorruptCheckpointError(f"unreadable MANIFEST.json ({e.strerror or e})") from None
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"unreadable MANIFEST.json ({e})") from None
    return verify_manifest(manifest, directory.name)


def verify_manifest(manifest: Any, directory_name: str) -> dict:
    """Check a decoded manifest: its own checksum, every field's type and range, its step against the
    directory's name. Anything retention or status reads from it is then well-formed. Raises
    CorruptCheckpointError (the directory is then treated like any corrupt checkpoint)."""
    if not isinstance(manifest, dict) or manifest.get("format") not in (1, FORMAT_VERSION):
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorruptCheckpointError(f"MANIFEST.json has an unknown format {found!r:.40}")
    try:
        if manifest["format"] >= 2:
            body = {k: v for k, v in manifest.items() if k != CHECKSUM}
            if manifest.get(CHECKSUM) != xxhash.xxh3_128_hexdigest(_canonical(body)):
                raise ValueError("it does not match its own checksum")
        step = manifest["step"]
        if not _is_int(step) or not 0 <= step < _MAX_STEP:
            raise ValueError(f"step {step!r:.40} is not a step number")
        named = FINAL_DIR.fullmatch(directory_name)
        if named and int(named[1]) != step:
            raise ValueError(f"its step {step} is not the step of its directory")
        if manifest.get("reason") not in REASONS:
            raise ValueError(f"unknown reason {manifest.get('reason')!r:.40}")
        if not _is_finite(manifest.get("created")):
            raise ValueError("created is not a time")
        metrics = manifest.get("metrics")
        if not isinstance(metrics, dict) or not all(isinstance(k, str) and _is_finite(v) for k, v in metrics.items()):
            raise ValueError("metrics must map names to finite numbers")
        files = manifest["files"]
        if not isinstance(files, dict) or not {DATA_FILE, STATE_FILE} <= files.keys():
            raise ValueError(f"files must list {DATA_FILE} and {STATE_FILE}")
        sharded = manifest.get("sharded", [])
        if not isinstance(sharded, list) or not all(isinstance(name, str) for name in sharded):
            raise ValueError("sharded must be a list of object names")
        for name, entry in files.items():
            known = name in (DATA_FILE, STATE_FILE) or (
                sharded and (name == SHARDS_METADATA or SHARD_FILE.fullmatch(name))
            )
            if not known:
                raise ValueError(f"unknown file name {name!r:.60}")
            if not (isinstance(entry, dict) and _is_int(entry.get("size")) and entry["size"] >= 0):
                raise ValueError(f"bad size for {name}")
            if not (isinstance(entry.get(CHECKSUM), str) and _HEX128.fullmatch(entry[CHECKSUM])):
                raise ValueError(f"bad checksum for {name}")
        if sharded and SHARDS_METADATA not in files:
            raise ValueError(f"sharded state without {SHARDS_METADATA}")
        _check_gpus(manifest.get("gpus", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"MANIFEST.json is malformed ({e})") from None
    return manifest


def _check_gpus(gpus: Any) -> None:
    """The optional GPU summary: GPU index -> its name and finite figures (gpumetrics.GpuSummary)."""
    if not isinstance(gpus, dict):
        raise ValueError("gpus must map GPU indices to their figures")
    for index, figures in gpus.items():
        if not (isinstance(index, str) and index.isascii() and index.isdigit() and isinstance(figures, dict)):
            raise ValueError(f"gpus has a bad entry {index!r:.40}")
        for name, value in figures.items():
            valid = isinstance(value, str) and len(value) <= 200 if name == "name" else _is_finite(value)
            if not (isinstance(name, str) and valid):
                raise ValueError(f"gpus[{index}] has a bad figure {name!r:.40}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False


def checkpoint_info(path: Path, manifest: dict) -> CheckpointInfo:
    """The record of a verified manifest (`read_manifest`)."""
    return CheckpointInfo(
        step=manifest["step"],
        reason=manifest["reason"],
        metrics={k: float(v) for k, v in manifest["metrics"].items()},
        path=path,
        created=float(manifest["created"]),
        nbytes=sum(f["size"] for f in manifest["files"].values()),
        sharded=tuple(manifest.get("sharded") or ()),
        gpus=manifest.get("gpus") or {},
    )


def final_dirs(directory: Path) -> list[Path]:
    """Directories named like a complete checkpoint (whether they are is up to their manifest)."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if FINAL_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def complete_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Checkpoints whose manifest is present and readable, by ascending step.

    Contents are not verified here (that is done on load); directories
    without a valid manifest are reported and left out.
    """
    found = []
    for path in final_dirs(directory):
        try:
            found.append(checkpoint_info(path, read_manifest(path)))
        except CorruptCheckpointError as e:
            log.warning("ignoring checkpoint %s: %s", path.name, e)
    return sorted(found, key=lambda i: i.step)


def latest_checkpoint(directory: Path) -> CheckpointInfo | None:
    infos = complete_checkpoints(directory)
    return infos[-1] if infos else None
