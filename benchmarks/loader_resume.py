"""Loader time to resume mid-epoch at sample 900,000 of 1,000,000, against iterating there.

    python benchmarks/loader_resume.py [--samples 1000000] [--at 900000] [--batch 100] [--repeats 3] [--workers 0]

A map-style dataset of `--samples` samples (4 floats each) in a DataLoader with
shuffle=True. Timed, with medians over `--repeats`:
  iterate there     iter() and next() up to the batch that holds sample `--at` (what a resume costs
                    without a position: every skipped batch fetched and collated);
  hydra_preempt     a fresh loader registered with a session position (loader_position.py), the saved
                    position loaded, iter() and the first batch (skipped batches: indices only);
  torchdata         the same with torchdata's StatefulDataLoader (load_state_dict, iter(), next()),
                    when torchdata is installed.
Each resumed first batch is checked against the batch an uninterrupted pass yields there.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from hydra_preempt.loader_position import LoaderPosition


def timed(fn) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def iterate_to(iterator, batches: int) -> Any:
    for _ in range(batches):
        next(iterator)
    return next(iterator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--at", type=int, default=900_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on torch 2.13
    dataset = TensorDataset(torch.randn(args.samples, 4))
    skip = args.at // args.batch

    def loader(cls: Any = DataLoader) -> Any:
        return cls(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers)

    times: dict[str, list[float]] = {"iterate there": [], "hydra_preempt": [], "torchdata": []}
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        StatefulDataLoader = None
    for _ in range(args.repeats):
        torch.manual_seed(0)
        position = LoaderPosition(loader())
        iterator = position.iterate()
        elapsed, expected = timed(functools.partial(iterate_to, iterator, skip))
        times["iterate there"].append(elapsed)
        position.yielded -= 1  # the position before the batch just taken
        state = position.state_dict()

        resumed = LoaderPosition(loader())
        resumed.load_state_dict(state)
        elapsed, batch = timed(lambda resumed=resumed: next(resumed.iterate()))
        assert torch.equal(batch[0], expected[0]), "the resumed batch is not the uninterrupted one"
        times["hydra_preempt"].append(elapsed)

        if StatefulDataLoader is not None:
            torch.manual_seed(0)
            original = loader(StatefulDataLoader)
            it = iter(original)
            for _ in range(skip):
                next(it)
            saved = original.state_dict()
            expected = next(it)
            fresh = loader(StatefulDataLoader)

            def resume(fresh=fresh, saved=saved):
                fresh.load_state_dict(saved)
                return next(iter(fresh))

            elapsed, batch = timed(resume)
            assert torch.equal(batch[0], expected[0])
            times["torchdata"].append(elapsed)
    print(
        f"resume at sample {args.at:,} of {args.samples:,} (batch {skip + 1} of {args.samples // args.batch}, "
        f"batch size {args.batch}, {args.workers} workers); medians of {args.repeats}"
    )
    base = statistics.median(times["iterate there"])
    for name, values in times.items():
        if values:
            median = statistics.median(values)
            ratio = "the baseline" if name == "iterate there" else f"{base / median:.1f}x faster than iterating there"
            print(f"  {name:14s} {median * 1e3:9.1f} ms   {ratio}")


if __name__ == "__main__":
    main()
