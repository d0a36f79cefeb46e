"""Save and load the same state three ways, in one run, and print throughput and ratios.

    .venv/bin/python benchmarks/checkpoint_io.py [--gb 1.0] [--tensors 64] [--repeats 6] [--dir DIR]

1. hydra_preempt's CheckpointStore (atomic directory, fsync, xxh3 checksums, verified load);
2. torch.save + fsync, torch.load(weights_only=True);
3. raw bytes: write + fsync of every tensor's bytes, read back into preallocated tensors.

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

    numel = int(args.gb * 1e9 / 4 / args.tensors)
    state = {f"layer{i}.weight": torch.randn(numel) for i in range(args.tensors)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or Path(__file__).parent))
    cold = drop_caches()
    print(f"state: {nbytes / 1e9:.2f} GB in {args.tensors} fp32 tensors; {args.repeats} repeats; directory {base}")
    print(
        f"loads: {'cold (page cache dropped before each)' if cold else 'WARM (cannot drop the page cache: not root?)'}\n"
    )

    saves: dict[str, list[float]] = {"hydra_preempt store": [], "torch.save + fsync": [], "raw write + fsync": []}
    loads: dict[str, list[float]] = {"hydra_preempt store": [], "torch.load(weights_only)": [], "raw read": []}
    try:
        for rep in range(args.repeats):
            for d in base.iterdir():
                shutil.rmtree(d) if d.is_dir() else d.unlink()
            methods: list[tuple[str, Callable[[], object]]] = [
                ("hydra_preempt store", functools.partial(store_save, state, base / "store", rep)),
                ("torch.save + fsync", lambda: torch_save(state, base / "torch.pt")),
                ("raw write + fsync", lambda: raw_save(state, base / "raw.bin")),
            ]
            # Rotate who goes first: a virtual disk slows down after a burst of writes.
            for name, fn in methods[rep % 3 :] + methods[: rep % 3]:
                os.sync()  # start each save with no other write-back in flight
                saves[name].append(timed(fn))
            readers: list[tuple[str, Callable[[], object]]] = [
                ("hydra_preempt store", lambda: store_load(base / "store")),
                ("torch.load(weights_only)", lambda: torch_load(base / "torch.pt")),
                ("raw read", lambda: raw_load(state, base / "raw.bin")),
            ]
            for name, fn in readers[rep % 3 :] + readers[: rep % 3]:
                drop_caches()
                loads[name].append(timed(fn))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def report(title: str, results: dict[str, list[float]]) -> dict[str, float]:
        print(title)
        medians = {name: statistics.median(times) for name, times in results.items()}
        for name, median in medians.items():
            runs = ", ".join(f"{t:.2f}" for t in results[name])
            print(f"  {name:26s} {median:6.2f} s  {nbytes / median / 1e9:5.2f} GB/s   (runs: {runs} s)")
        return medians

    s = report("save (median)", saves)
    load = report("\nload (median)", loads)
    store_save_s, torch_save_s, raw_save_s = s.values()
    store_load_s, torch_load_s, raw_load_s = load.values()
    print("\nratios (throughput; >1 means hydra_preempt is faster)")
    print(
        f"  save: store / torch.save = {torch_save_s / store_save_s:.2f}   store / raw = {raw_save_s / store_save_s:.2f}"
    )
    print(
        f"  load: store / torch.load = {torch_load_s / store_load_s:.2f}   store / raw = {raw_load_s / store_load_s:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
