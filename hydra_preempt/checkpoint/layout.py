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
import re
from dataclasses import dataclass, field
from pathlib import Path

from .retention import CheckpointRecord

log = logging.getLogger("hydra_preempt.checkpoint")

FORMAT_VERSION = 1
DATA_FILE = "tensors.bin"
STATE_FILE = "state.json"
MANIFEST_FILE = "MANIFEST.json"
CHECKSUM = "xxh3_128"
SHARDS_METADATA = "shards.json"  # sharded state (sharded.py): DCP's metadata as JSON, beside shard-NNNNN.bin
SHARD_FILE = re.compile(r"^shard-\d{5}\.bin$")


FINAL_DIR = re.compile(r"^step-(\d{9,})$")


class CorruptCheckpointError(Exception):
    """A checkpoint directory is incomplete or its contents do not match its manifest."""


@dataclass(frozen=True)
class CheckpointInfo(CheckpointRecord):
    path: Path = field(default=Path("."), compare=False)
    created: float = 0.0
    nbytes: int = 0
    sharded: tuple[str, ...] = ()  # objects whose state is sharded (sharded.py), written by every rank


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CorruptCheckpointError("no MANIFEST.json (the save did not finish)") from None
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"unreadable MANIFEST.json ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"MANIFEST.json has an unknown format {manifest.get('format') if isinstance(manifest, dict) else manifest!r}"
        )
    try:
        int(manifest["step"])
        for name in (DATA_FILE, STATE_FILE):
            entry = manifest["files"][name]
            int(entry["size"]), str(entry[CHECKSUM])
        for name, entry in manifest["files"].items():
            if not (name in (DATA_FILE, STATE_FILE, SHARDS_METADATA) or SHARD_FILE.match(name)):
                raise ValueError(f"unknown file name {name!r}")
            if not isinstance(entry["size"], int) or entry["size"] < 0 or not isinstance(entry[CHECKSUM], str):
                raise ValueError(f"bad entry for {name}")
        sharded = manifest.get("sharded", [])
        if not isinstance(sharded, list) or not all(isinstance(name, str) for name in sharded):
            raise ValueError("sharded must be a list of object names")
        if sharded and SHARDS_METADATA not in manifest["files"]:
            raise ValueError(f"sharded state without {SHARDS_METADATA}")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"MANIFEST.json is malformed ({e})") from None
    return manifest


def checkpoint_info(path: Path, manifest: dict) -> CheckpointInfo:
    metrics: dict[str, float] = manifest["metrics"] if isinstance(manifest.get("metrics"), dict) else {}
    return CheckpointInfo(
        step=int(manifest["step"]),
        reason=str(manifest.get("reason", "")),
        metrics=metrics,
        path=path,
        created=float(manifest.get("created", 0.0)),
        nbytes=sum(int(f["size"]) for f in manifest["files"].values()),
        sharded=tuple(str(name) for name in manifest.get("sharded") or ()),
    )


def final_dirs(directory: Path) -> list[Path]:
    """Directories named like a complete checkpoint (whether they are is up to their manifest)."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if FINAL_DIR.match(p.name) and p.is_dir()]


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
