"""The cost of carrying each DataLoader worker's generator states with its batches.

    python benchmarks/worker_rng_carry.py [--batches 150] [--workers 2] [--repeats 3]

A vision-style pipeline: 224x224 RGB images (uint8, made in __getitem__) with a random flip and
random brightness drawn from torch's generator inside the workers, batch size 32. The loader's
time per batch (the loop does nothing else: the workers are the bottleneck) through the session's
position, which carries every worker's generator states with each batch (LoaderPosition.iterate),
against a plain `for batch in loader`: the time of the batches after the first 20, divided by their
number; the median of `--repeats` interleaved runs of each. The goal is under 1% more. Also what the
carrying itself costs a worker per batch (taking the states, pickling them) and the main process
(unpickling them), timed alone.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
import timeit

import torch
from torch.utils.data import DataLoader, Dataset

from hydra_preempt.loader_position import LoaderPosition, _saved_worker_rng, _worker_rng


class Images(Dataset):
    def __len__(self) -> int:
        return 100_000

    def __getitem__(self, i: int) -> torch.Tensor:
        image = torch.full((3, 224, 224), i % 251, dtype=torch.uint8)
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image.float() * (0.8 + 0.4 * torch.rand(()))).clamp_(0, 255).to(torch.uint8)


def per_batch_ms(batches: int, workers: int, carried: bool) -> float:
    torch.manual_seed(0)
    loader = DataLoader(Images(), batch_size=32, shuffle=True, num_workers=workers)
    iterator = LoaderPosition(loader).iterate() if carried else iter(loader)
    for _ in range(20):  # workers started, prefetching
        next(iterator)
    began = time.perf_counter()
    for _ in range(batches - 20):
        next(iterator)
    elapsed = time.perf_counter() - began
    del iterator
    return elapsed / (batches - 20) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    runs = [
        (per_batch_ms(args.batches, args.workers, True), per_batch_ms(args.batches, args.workers, False))
        for _ in range(args.repeats)
    ]
    carried, plain = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    spread = statistics.median(
        abs(a - b) / b for a, b in zip(sorted(r[1] for r in runs), sorted(r[1] for r in runs)[1:])
    )
    n = 2000
    states = _worker_rng()
    take_us = timeit.timeit(lambda: pickle.dumps(_worker_rng()), number=n) / n * 1e6
    pickled = pickle.dumps(states)
    give_us = timeit.timeit(lambda: _saved_worker_rng(pickle.loads(pickled)), number=n) / n * 1e6
    print(f"batch of 32 images 3x224x224, {args.workers} workers; medians of {args.repeats} interleaved runs")
    print(
        f"plain DataLoader:                {plain:7.2f} ms a batch (runs differ by {spread * 100:.1f}% from the next)"
    )
    print(
        f"carrying the workers' states:    {carried:7.2f} ms a batch ({(carried / plain - 1) * 100:+.1f}%, goal < 1%)"
    )
    print(
        f"the carrying alone: {take_us:.0f} us a batch in a worker ({take_us / 1e3 / (plain * args.workers) * 100:.1f}% "
        f"of a worker's batch), {give_us:.0f} us in the main process; {len(pickled)} bytes"
    )


if __name__ == "__main__":
    main()
