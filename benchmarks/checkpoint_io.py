"""Save and load the same state three ways, in one run, and print throughput and ratios.

    .venv/bin/python benchmarks/checkpoint_io.py [--gb 1.0] [--tensors 64] [--repeats 6] [--dir DIR]

1. hydra_preempt's CheckpointStore (atomic directory, fsync, xxh3 checksums, verified load);
2. torch.save + fsync, torch.load(weights_only=True);
3. raw bytes: write + fsync of every tensor's bytes, read back into preallocated tensors;
4. safetensors' save_file + fsync, load_file (when safetensors is installed);
5. torch.distributed.checkpoint (DCP) save (its writer fsyncs) and load into preallocated tensors.

The three methods take turns inside each repeat, in a rotating order, so
that they share the disk's noise; loads are cold when the page cache can be dropped (root),
and the report says which. Medians are printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from hydra_preempt.checkpoint.retention import RetentionPolicy
from hydra_preempt.checkpoint.store import CheckpointStore
from hydra_preempt.checkpoint.tree import array_bytes
from hydra_preempt.checkpoint.writer import Snapshot


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def store_save(state, directory: Path, step: int) -> None:
    CheckpointStore(directory, RetentionPolicy(keep_last=1)).save(Snapshot.capture(state), step, "manual")


def store_load(directory: Path) -> None:
    CheckpointStore(directory).load_latest()


def torch_save(state, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(path: Path) -> None:
    torch.load(path, weights_only=True)


def raw_save(state, path: Path) -> None:
    with open(path, "wb") as f:
        for t in state.values():
            f.write(array_bytes(t))
        f.flush()
        os.fsync(f.fileno())


def raw_load(state, path: Path) -> list[torch.Tensor]:
    loaded = []  # kept, as a real loader must: fresh memory costs page faults
    with open(path, "rb", buffering=0) as f:
        for t in state.values():
            loaded.append(torch.empty_like(t))
            view = array_bytes(loaded[-1])
            done = 0
            while done < view.nbytes:
                done += f.readinto(view[done:])
    return loaded


def safetensors_save(state, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safetensors_load(path: Path) -> None:
    from safetensors.torch import load_file

    load_file(str(path))


def dcp_save(state, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), sync_files=True))


def dcp_load(state, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    template = {k: torch.empty_like(t) for k, t in state.items()}
    dcp.load(template, storage_reader=dcp.FileSystemReader(str(path)))


def has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory on the disk to test (default: a temporary one under ./benchmarks)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process

    numel = int(args.gb * 1e9 / 4 / args.tensors)
    state = {f"layer{i}.weight": torch.randn(numel) for i in range(args.tensors)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or Path(__file__).parent))
    cold = drop_caches()
    print(f"state: {nbytes / 1e9:.2f} GB in {args.tensors} fp32 tensors; {args.repeats} repeats; directory {base}")
    print(
        f"loads: {'cold (page cache dropped before each)' if cold else 'WARM (cannot drop the page cache: not root?)'}\n"
    )

    safetensors = has_safetensors()
    saves: dict[str, list[float]] = {}
    loads: dict[str, list[float]] = {}
    try:
        for rep in range(args.repeats):
            for d in base.iterdir():
                shutil.rmtree(d) if d.is_dir() else d.unlink()
            methods: list[tuple[str, Callable[[], object]]] = [
                ("hydra_preempt store", functools.partial(store_save, state, base / "store", rep)),
                ("torch.save + fsync", lambda: torch_save(state, base / "torch.pt")),
                ("raw write + fsync", lambda: raw_save(state, base / "raw.bin")),
                ("DCP save", lambda: dcp_save(state, base / "dcp")),
            ]
            readers: list[tuple[str, Callable[[], object]]] = [
                ("hydra_preempt store", lambda: store_load(base / "store")),
                ("torch.load(weights_only)", lambda: torch_load(base / "torch.pt")),
                ("raw read", lambda: raw_load(state, base / "raw.bin")),
                ("DCP load", lambda: dcp_load(state, base / "dcp")),
            ]
            if safetensors:
                methods.append(("safetensors + fsync", lambda: safetensors_save(state, base / "st.safetensors")))
                readers.append(("safetensors load_file", lambda: safetensors_load(base / "st.safetensors")))
            # Rotate who goes first: a virtual disk slows down after a burst of writes.
            turn = rep % len(methods)
            for name, fn in methods[turn:] + methods[:turn]:
                os.sync()  # start each save with no other write-back in flight
                saves.setdefault(name, []).append(timed(fn))
            for name, fn in readers[turn:] + readers[:turn]:
                drop_caches()
                loads.setdefault(name, []).append(timed(fn))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def report(title: str, results: dict[str, list[float]], floor: str) -> None:
        """Medians with min-max; `floor`'s time over each one's (>1: faster than the raw floor)."""
        print(f"{title} (median, min-max; floor / it: >1 is faster than {floor})")
        for name, times in results.items():
            median = statistics.median(times)
            print(
                f"  {name:26s} {median:6.2f} s ({min(times):.2f}-{max(times):.2f})  {nbytes / median / 1e9:5.2f} GB/s"
                f"   {statistics.median(results[floor]) / median:5.2f}x"
            )

    report("save", saves, "raw write + fsync")
    print()
    report("load", loads, "raw read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
