"""A step with a large registered object that is no module, optimizer or scaler, checkpoints off.

    python benchmarks/large_custom_state.py [--mb 400] [--steps 60] [--repeats 3]

A small MLP and its AdamW (a step of a few milliseconds), registered with the session, with and
without an EMA-like object holding `--mb` MB of float32 tensors (its own state_dict() returns them,
as a replay buffer's or an EMA's does). Emergency checkpoints on (the default): at every step start
the session remembers the state the step starts from. The median time of a whole loop iteration
(the session's calls included) with the object, against the same without it; the goal is 1.2x
or less. Also the process's peak memory growth over the object itself (ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import torch

from hydra_preempt.config import SessionConfig
from hydra_preempt.session.api import Session


class Buffer:
    """A replay buffer or an EMA kept as tensors, changed in place."""

    def __init__(self, mb: int) -> None:
        self.data = torch.zeros(mb * 2**20 // 4)
        self.count = 0

    def state_dict(self) -> dict:
        return {"data": self.data, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.data.copy_(state["data"])
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
            session.report(loss=loss.item())
            now = time.perf_counter()
            times.append(now - last)
            last = now
        session.close()
    return statistics.median(times[5:]) * 1e3  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    median_step_ms(10, None)  # warm up torch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    buffer = Buffer(args.mb)
    runs = [(median_step_ms(args.steps, buffer), median_step_ms(args.steps, None)) for _ in range(args.repeats)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with_object, without = min(r[0] for r in runs), min(r[1] for r in runs)  # interleaved: the same noise
    ratio = with_object / without
    print(f"median step without the object: {without:.2f} ms")
    print(f"median step with a {args.mb} MB registered object: {with_object:.2f} ms ({ratio:.2f}x, goal <= 1.2x)")
    print(f"peak memory growth: {peak - before:.0f} MB (the object itself: {args.mb} MB)")


if __name__ == "__main__":
    main()
