"""Export a model's full weights from any checkpoint (single process, DDP or sharded) as safetensors.

    hydra-preempt export RUN_DIR [--step N] [--object model] --out model.safetensors

The checkpoint is verified first (sizes and checksums of every file); sharded
state is read through the same pickle-free reader as a resume, reassembled
into full tensors in this one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import HydraPreemptError
from ..rundir import RunHistory
from .layout import CorruptCheckpointError, read_manifest, step_dir_name
from .sharded import ShardedFormatError, empty_template, load_shards, read_shards_metadata
from .store import CheckpointStore
from .writer import read_checkpoint_files


def export_weights(run_dir: Path, out: Path, step: int | None = None, name: str = "model") -> tuple[int, int]:
    """Write `name`'s tensors from the checkpoint of `step` (default: the newest good one); (step, tensors)."""
    directory = RunHistory.read(run_dir).checkpoint_dir or Path(run_dir) / "checkpoints"
    path, tree, manifest = _verified(CheckpointStore(directory), step)
    if name in (manifest.get("sharded") or []):
        try:
            metadata = read_shards_metadata(path, manifest["files"])
            flat = empty_template(metadata, f"{name}.")
            load_shards(path, metadata, flat)
        except (OSError, ShardedFormatError) as e:
            raise HydraPreemptError(f"{path}: the sharded state cannot be read ({e})") from None
        tensors = {key.removeprefix(f"{name}."): value for key, value in flat.items()}
    else:
        objects = {**tree["objects"], **tree["ranks"][0]["objects"]}
        if name not in objects:
            raise HydraPreemptError(
                f"{path} holds no object {name!r}; it holds {sorted({*objects, *manifest.get('sharded', [])})}"
            )
        tensors = _tensors(objects[name], name)
    if not tensors:
        raise HydraPreemptError(f"{path}: {name!r} holds no tensors to export")
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().clone() for k, v in tensors.items()},
        str(out),
        metadata={"step": str(manifest["step"])},
    )
    return int(manifest["step"]), len(tensors)


def _verified(store: CheckpointStore, step: int | None) -> tuple[Path, Any, dict]:
    if step is None:
        loaded = store.load_latest()
        if loaded is None:
            raise HydraPreemptError(f"no complete checkpoint in {store.directory}")
        info, tree = loaded
        return info.path, tree, read_manifest(info.path)
    path = store.directory / step_dir_name(step)
    try:
        manifest = read_manifest(path)
        return path, read_checkpoint_files(path, manifest), manifest
    except CorruptCheckpointError as e:
        raise HydraPreemptError(f"{path} is not a usable checkpoint: {e}") from None


def _tensors(state: Any, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HydraPreemptError(f"{name!r} is not a module's state (a mapping of names to tensors)")
    return state
