"""The few collectives the session needs, at step boundaries only (never in a signal handler).

With no initialised process group every function is a local no-op, so the
same session code runs single-process and multi-rank.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import CheckpointDirError
from .fsutil import create_file


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flags: list[int]) -> list[int]:
    """Element-wise maximum over all ranks: one rank's request becomes everyone's."""
    if world()[1] == 1:
        return flags
    tensor = torch.tensor(flags, dtype=torch.int64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    rank, size = world()
    if size == 1:
        return [obj]
    gathered: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_rank0(obj: Any) -> Any:
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same_directories(directories: list[Path]) -> None:
    """Every rank was given the same `directories` (a collective): ranks given different ones (a per-rank
    path in the config, a relative path from different working directories) would each write a run of
    their own. CheckpointDirError on every rank, naming them, in one line."""
    rank, size = world()
    if size == 1:
        return
    host = socket.gethostname()
    paths = [os.path.abspath(d) for d in directories]
    given = gather_to_rank0((host, rank, paths))
    message = None
    if rank == 0:
        assert given is not None
        differ = [(h, r, p) for h, r, p in given if p != paths]
        if differ:
            where = "; ".join(f"rank {r} on {h}: {', '.join(p)}" for h, r, p in differ)
            message = (
                f"the ranks were given different run or checkpoint directories (rank 0 on {host}: "
                f"{', '.join(paths)}; {where}): every rank must use the same ones"
            )
    message = broadcast_from_rank0(message)
    if message:
        raise CheckpointDirError(message)


def check_shared_directories(directories: list[Path], attempts: int = 5, wait_s: float = 1.0) -> None:
    """Every rank sees the same `directories` (a collective; their paths checked equal already): rank 0
    writes a probe in each and every rank reads it back. A node-local path in a multi-node job (each
    node its own /tmp, a local scratch disk) would give every node a checkpoint of its own shards only:
    CheckpointDirError, on every rank, in one line. A rank that does not find the probe at once looks
    again (`attempts` times, `wait_s` apart): a network file system may cache a directory's old listing."""
    rank, size = world()
    if size == 1:
        return
    host = socket.gethostname()
    paths = [os.path.abspath(d) for d in directories]
    token = broadcast_from_rank0(secrets.token_hex(8) if rank == 0 else None)
    probes = [Path(p) / f".shared-probe-{token}" for p in paths]
    failed = None
    if rank == 0:
        try:
            for probe in probes:
                with create_file(probe) as f:
                    f.write(token.encode())
        except OSError as e:
            failed = f"cannot write in {probe.parent}: {e.strerror or e}"
    failed = broadcast_from_rank0(failed)  # the probes are written (or not) before any rank looks
    if failed is None:
        missing = [str(p.parent) for p in probes if not _sees(p, token, attempts, wait_s)]
        verdicts = gather_to_rank0((host, rank, missing))
        if rank == 0:
            assert verdicts is not None
            blind = [(h, r, m) for h, r, m in verdicts if m]
            if blind:
                where = "; ".join(f"rank {r} on {h} cannot see {', '.join(m)}" for h, r, m in blind)
                failed = (
                    f"the ranks do not share the run's directories ({where}, written by rank 0 on {host}): every "
                    "node must see one run directory and checkpoint directory (a shared file system, not a "
                    "node-local path)"
                )
        failed = broadcast_from_rank0(failed)
    if rank == 0:
        for probe in probes:
            with contextlib.suppress(OSError):
                probe.unlink()
    if failed:
        raise CheckpointDirError(failed)


def _sees(probe: Path, token: str, attempts: int, wait_s: float) -> bool:
    for attempt in range(attempts):
        try:
            if probe.read_text() == token:
                return True
        except OSError:
            pass
        if attempt + 1 < attempts:
            time.sleep(wait_s)
    return False
