"""Export a model's full weights from any checkpoint (single process, DDP or sharded) as safetensors.

    hydra-preempt export RUN_DIR [--step N] [--object NAME] [--force] --out model.safetensors

NAME is a registered object (`model` by default; in a run of hydra_preempt.lightning,
`lightning.state_dict`, the LightningModule's weights inside Lightning's checkpoint; in one of
hydra_preempt.transformers, `transformers.model`), or a dotted path into one's state.

Read-only: nothing in the run or its checkpoint directory is renamed, moved or written. The
checkpoints are those of RUN_DIR (rundir.checkpoint_dir_of: a moved or copied run exports its
own). The checkpoint is verified first (sizes and checksums of every file, and for sharded
state the check of its metadata against the files, shard_layout.py); without --step, a
checkpoint that fails is reported and the previous one taken. Sharded state is read through the
same pickle-free reader as a resume, reassembled into full tensors in this one process. The
output is written atomically: a temporary file beside it, fsynced, renamed over it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import HydraPreemptError, OutputWriteError
from ..fsutil import fsync_dir, umask
from ..rundir import checkpoint_dir_of
from .checkpointer import first_line
from .layout import CorruptCheckpointError, complete_checkpoints, final_dirs, read_manifest, step_dir_name
from .sharded import ShardedFormatError, empty_template, load_shards, read_shards_metadata
from .writer import read_checkpoint_files

log = logging.getLogger("hydra_preempt.checkpoint")

# What is exported when --object is not given: the first of these a checkpoint holds
DEFAULT_OBJECTS = ("model", "lightning.state_dict", "transformers.model")


def export_weights(
    run_dir: Path, out: Path, step: int | None = None, name: str | None = None, force: bool = False
) -> tuple[int, int, str]:
    """Write `name`'s tensors (default: the first of DEFAULT_OBJECTS there) from the checkpoint of `step`
    (default: the newest good one); (step, tensors, the name exported).

    Raises HydraPreemptError (bad input: exit 2) or OutputWriteError (writing `out` failed: exit 1)."""
    if step is not None and step < 0:
        raise HydraPreemptError(f"--step {step}: a step is a number >= 0")
    private = _claim_output(out, force)
    try:
        directory = checkpoint_dir_of(run_dir)
        saved_step, tensors, name = _read(directory, step, name)
        _write(private / out.name, out, tensors, saved_step)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return saved_step, len(tensors), name


def _claim_output(out: Path, force: bool) -> Path:
    """Check `out` before anything is read, and create the temporary directory the export is written
    into: this user's alone (mkdtemp, mode 0700), so that nobody else sharing `out`'s directory can
    put a link where safetensors (which opens by path) writes."""
    if out.is_dir():
        raise HydraPreemptError(f"--out {out} is a directory; name the file to write")
    if os.path.lexists(out) and not force:
        raise HydraPreemptError(f"--out {out} exists; pass --force to replace it")
    if os.path.lexists(out) and not out.is_file():
        raise HydraPreemptError(f"--out {out} exists and is not a regular file")
    parent = out.parent
    if not parent.is_dir():
        what = "does not exist" if not os.path.lexists(parent) else "is not a directory"
        raise HydraPreemptError(f"--out {out}: {parent} {what}")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise HydraPreemptError(f"--out {out} cannot be written: {e.strerror or e}") from None


def _write(tmp: Path, out: Path, tensors: dict[str, torch.Tensor], step: int) -> None:
    from safetensors.torch import save_file

    try:
        save_file(
            {k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata={"step": str(step)}
        )
        os.chmod(tmp, 0o666 & ~umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        raise OutputWriteError(f"could not write {out}: {e.strerror or e}") from None


def _read(directory: Path, step: int | None, name: str | None) -> tuple[int, dict[str, torch.Tensor], str]:
    """`name`'s tensors from the checkpoint of `step`, or from the newest one that verifies."""
    if step is not None:
        path = directory / step_dir_name(step)
        if not path.is_dir() or path.is_symlink():
            steps = [info.step for info in complete_checkpoints(directory)]
            raise HydraPreemptError(f"no checkpoint of step {step} in {directory}; its checkpoints: {steps}")
        try:
            return (step, *_tensors_of(path, name))
        except CorruptCheckpointError as e:
            raise HydraPreemptError(f"{path} is not a usable checkpoint: {e}") from None
    for path in sorted(final_dirs(directory), key=lambda p: p.name, reverse=True):
        try:
            tensors, exported = _tensors_of(path, name)
        except CorruptCheckpointError as e:
            log.warning("checkpoint %s is unusable (%s); trying the previous one (nothing is moved)", path.name, e)
            continue
        return int(read_manifest(path)["step"]), tensors, exported
    raise HydraPreemptError(f"no complete checkpoint in {directory}")


def _tensors_of(path: Path, name: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """Verify the checkpoint at `path` and read `name`'s full tensors; (tensors, the name read). Raises
    CorruptCheckpointError for a checkpoint that fails verification, HydraPreemptError for one without
    such a model."""
    manifest = read_manifest(path)
    tree = read_checkpoint_files(path, manifest)
    objects = {**tree["objects"], **tree["ranks"][0]["objects"]}
    held = sorted({*objects, *manifest.get("sharded", [])})
    if name is None:
        name = next((n for n in DEFAULT_OBJECTS if n.split(".")[0] in held), None)
        if name is None:
            raise HydraPreemptError(
                f"{path} holds no {' or '.join(map(repr, DEFAULT_OBJECTS))}; it holds {held}: name one with --object"
            )
    if name in (manifest.get("sharded") or []):
        try:
            metadata = read_shards_metadata(path, manifest["files"])
            flat = empty_template(metadata, f"{name}.")
            load_shards(path, metadata, flat)
        except (OSError, ShardedFormatError, CheckpointException) as e:
            raise CorruptCheckpointError(f"the sharded state cannot be read ({first_line(e)})") from None
        tensors = {key.removeprefix(f"{name}."): value for key, value in flat.items()}
    else:
        head, *keys = name.split(".")
        if head not in objects:
            raise HydraPreemptError(f"{path} holds no object {head!r}; it holds {held}")
        state = objects[head]
        for depth, key in enumerate(keys, 1):
            if not (isinstance(state, dict) and key in state):
                raise HydraPreemptError(f"{path}: {'.'.join([head, *keys[: depth - 1]])!r} holds no {key!r}")
            state = state[key]
        tensors = _module_tensors(state, name)
    if not tensors:
        raise HydraPreemptError(f"{path}: {name!r} holds no tensors to export")
    return tensors, name


def _module_tensors(state: Any, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HydraPreemptError(f"{name!r} is not a module's state (a mapping of names to tensors)")
    return state
