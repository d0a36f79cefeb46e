"""A step with a large registered object that is no module, optimizer or scaler, checkpoints off.

    python benchmarks/large_custom_state.py [--mb 200,2048] [--steps 30] [--repeats 3]

A small MLP and its AdamW (a step of a few milliseconds), registered with the session, with and
without an object holding MB of float32 state, changed in place at every step as an EMA's or a
replay buffer's is: once as torch tensors, once as NumPy arrays (its own state_dict() returns them).
Emergency checkpoints on (the default): at every step start the session remembers the state the
step starts from. The median time of a whole loop iteration (the session's calls included) with the
object, against the same without it; the goal is 1.2x or less. Beside it, for the NumPy object,
the same step if its state were copied at every step start (as before: there is no cheaper way to
know it unchanged), and the process's peak memory growth over the objects themselves (ru_maxrss).
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch

from hydra_preempt.config import SessionConfig
from hydra_preempt.session import state
from hydra_preempt.session.api import Session


class Buffer:
    """A replay buffer or an EMA, changed in place at every step: torch tensors or NumPy arrays."""

    def __init__(self, mb: int, kind: str) -> None:
        size = mb * 2**20 // 4
        self.data: Any = torch.ones(size) if kind == "tensor" else np.ones(size, dtype=np.float32)  # pages touched
        self.count = 0

    def add(self, value: float) -> None:
        self.data[self.count % len(self.data)] = value
        self.count += 1

    def state_dict(self) -> dict:
        return {"data": self.data, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.data[:] = state["data"]
        self.count = state["count"]


def median_step_ms(steps: int, buffer: Buffer | None) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 512)
    config = SessionConfig.from_mapping({"checkpoint": {"every_steps": None}, "divergence": {"enabled": False}})
    times = []
    with tempfile.TemporaryDirectory() as run_dir:
        session = Session(run_dir, config)
        session.open()
        session.prepare()
        session.register(model=model, optimizer=optimizer, **({"buffer": buffer} if buffer is not None else {}))
        last = time.perf_counter()
        for _ in session.steps(steps):
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if buffer is not None:
                buffer.add(loss.item())
            session.report(loss=loss.item())
            now = time.perf_counter()
            times.append(now - last)
            last = now
        session.close()
    return statistics.median(times[5:]) * 1e3  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="200,2048", help="comma-separated sizes of the object, in MB")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("hydra_preempt").setLevel(logging.ERROR)  # the one-line note, once per session here
    median_step_ms(10, None)  # warm up torch
    print(f"medians, best of {args.repeats}; goal <= 1.2x")
    print(f"{'object':<20} {'step':>9} {'without':>9} {'ratio':>7}   {'copied each step':>22}   peak memory growth")
    for mb in (int(m) for m in args.mb.split(",")):
        for kind in ("tensor", "numpy"):
            buffer = Buffer(mb, kind)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            runs = [(median_step_ms(args.steps, buffer), median_step_ms(args.steps, None)) for _ in range(args.repeats)]
            growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
            with_object, without = min(r[0] for r in runs), min(r[1] for r in runs)  # interleaved: the same noise
            copied = "-"
            if kind == "numpy":
                limit, state.COPY_LIMIT_NS = state.COPY_LIMIT_NS, 10**18  # as before: copied at every step start
                try:
                    each_step = min(median_step_ms(args.steps, buffer) for _ in range(args.repeats))
                finally:
                    state.COPY_LIMIT_NS = limit
                copied = f"{each_step:.2f} ms ({each_step / without:.1f}x)"
            print(
                f"{f'{mb} MB of {kind}':<20} {with_object:>6.2f} ms {without:>6.2f} ms {with_object / without:>6.2f}x"
                f"   {copied:>22}   {max(growth, 0):.0f} MB beyond the object"
            )
            del buffer


if __name__ == "__main__":
    main()
