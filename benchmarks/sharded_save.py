"""Sharded checkpoint throughput: this project's parallel save vs gather-to-rank-0 vs DCP's plain save.

    python benchmarks/sharded_save.py [--gb 1.0] [--ranks 2] [--repeats 3] [--dir DIR]

Starts `--ranks` processes (torchrun-style, gloo, CPU), builds an FSDP2 model
whose parameters plus AdamW moments are about `--gb` GB, and in one run,
methods taking turns in a rotating order:
  save  parallel:  every rank writes its shard (hydra_preempt's Checkpointer, manifest and all)
        gather:    full state gathered to rank 0, rank 0 writes it alone (hydra_preempt's single-writer store)
        dcp:       torch.distributed.checkpoint's own FileSystemWriter (pickled metadata, torch.save items)
  load  the same three ways back into the sharded model (gather: every rank reads the whole file).
Prints medians, throughput and ratios, and the per-rank write bandwidth that
predicts how a save scales when each rank has its own disk or link.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def worker(args: argparse.Namespace) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hydra_preempt.checkpoint.checkpointer import Checkpointer
    from hydra_preempt.checkpoint.retention import RetentionPolicy
    from hydra_preempt.checkpoint.store import CheckpointStore
    from hydra_preempt.checkpoint.writer import Snapshot
    from hydra_preempt.config import CheckpointConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    # parameters + two AdamW moments = 3 copies: width^2 * layers * 4 bytes * 3 = gb
    layers = 8
    width = int((args.gb * 1e9 / (3 * 4 * layers)) ** 0.5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())  # global: parameters and two moments

    base = Path(args.dir)
    checkpointer = Checkpointer(CheckpointStore(base / "parallel"), CheckpointConfig(keep_last=1))
    step = [0]

    def sharded() -> dict[str, Any]:
        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def save_parallel() -> None:
        step[0] += 1
        checkpointer.save(
            step[0], "manual", {}, {"objects": {}, "ranks": [], "session": {}} if rank == 0 else None, sharded()
        )

    def save_gather() -> None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        if rank == 0:
            step[0] += 1
            CheckpointStore(base / "gather", RetentionPolicy.from_config(CheckpointConfig(keep_last=1))).save(
                Snapshot.capture({"model": model_state, "optimizer": optim_state}), step[0], "manual"
            )
        dist.barrier()

    def save_dcp() -> None:
        if rank == 0:
            shutil.rmtree(base / "dcp", ignore_errors=True)
        dist.barrier()
        dcp.save(sharded(), checkpoint_id=str(base / "dcp"))

    def load_parallel() -> None:
        loaded = checkpointer.load_latest()
        assert loaded is not None
        info, _, metadata = loaded
        assert metadata is not None
        state = sharded()
        checkpointer.load_shards(info, metadata, state)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def load_gather() -> None:
        """As the single-writer path loads: every rank reads the whole file, then keeps its part."""
        tree = CheckpointStore(base / "gather").load_latest()[1]  # type: ignore[index]
        options = StateDictOptions(full_state_dict=True)
        set_state_dict(
            model, optimizer, model_state_dict=tree["model"], optim_state_dict=tree["optimizer"], options=options
        )

    def load_dcp() -> None:
        state = sharded()
        dcp.load(state, checkpoint_id=str(base / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    saves = {
        "parallel (hydra_preempt)": save_parallel,
        "gather to rank 0": save_gather,
        "DCP FileSystemWriter": save_dcp,
    }
    loads = {
        "parallel (hydra_preempt)": load_parallel,
        "gather to rank 0": load_gather,
        "DCP FileSystemWriter": load_dcp,
    }
    times: dict[str, dict[str, list[float]]] = {"save": {k: [] for k in saves}, "load": {k: [] for k in loads}}
    for repeat in range(args.repeats):
        for kind, methods in (("save", saves), ("load", loads)):
            names = list(methods)
            for name in names[repeat % 3 :] + names[: repeat % 3]:  # rotate who goes first
                if kind == "load":
                    drop_caches()
                dist.barrier()
                started = time.perf_counter()
                methods[name]()
                dist.barrier()
                times[kind][name].append(time.perf_counter() - started)
    if rank == 0:
        report(times, nbytes, world, args)
    dist.destroy_process_group()


def drop_caches() -> None:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: warm loads


def report(times: dict[str, dict[str, list[float]]], nbytes: int, world: int, args: argparse.Namespace) -> None:
    print(
        f"state: {nbytes / 1e9:.2f} GB (FSDP2 parameters + AdamW moments) over {world} ranks; "
        f"{args.repeats} repeats; directory {args.dir}"
    )
    for kind, results in times.items():
        print(f"\n{kind} (median)")
        medians = {name: statistics.median(t) for name, t in results.items()}
        for name, median in medians.items():
            runs = ", ".join(f"{t:.2f}" for t in results[name])
            print(f"  {name:26s} {median:7.2f} s  {nbytes / median / 1e9:5.2f} GB/s   (runs: {runs} s)")
        ours = medians["parallel (hydra_preempt)"]
        print(
            "  ratios (>1: the parallel path is faster): "
            + ", ".join(
                f"vs {name} {m / ours:.2f}" for name, m in medians.items() if name != "parallel (hydra_preempt)"
            )
        )
        if kind == "save":
            per_rank = nbytes / world / ours / 1e9
            print(
                f"  per-rank write bandwidth {per_rank:.2f} GB/s: with a disk or link per rank, a save of S GB over R ranks "
                f"takes about S / (R x {per_rank:.2f}) s; through one shared disk, at most that disk's bandwidth"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    base = Path(args.dir or tempfile.mkdtemp(prefix="sharded-bench-", dir="."))
    base.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs: list[subprocess.Popen] = []
    for rank in range(args.ranks):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(args.ranks),
            "PYTHONWARNINGS": "ignore",
        }
        cmd = [sys.executable, __file__, "--worker", f"--gb={args.gb}", f"--repeats={args.repeats}", f"--dir={base}"]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
