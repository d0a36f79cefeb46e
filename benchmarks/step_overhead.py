"""What the session adds to every training step, checkpoints off.

    python benchmarks/step_overhead.py [--tensors 1000] [--steps 300] [--repeats 5]

A model of `--tensors` parameter tensors (Linear layers of 8x8, weight and
bias) and its AdamW: the loop body (forward, backward, optimizer step,
`session.report(loss=...)`'s argument) is timed from inside the loop; the
time outside the bodies is measured for the same loop over `range()` too,
and the session's share of each step (`steps()` between yields and
`report()`) is the difference. Emergency checkpoints on (the default) and
off; medians over repeats, in microseconds per step, against the goal of
200 us (0.2% of a 100 ms step).

Also the same session calls timed back to back on a live session (warm
caches). The difference matters on a small machine: the first Python code
after a step's heavy tensor work runs several times slower than the same
code run again (cold caches; writing one JSON line measured 105 us right
after a step and 18 us just after), a cost any code there pays.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from hydra_preempt.config import SessionConfig
from hydra_preempt.session.api import Session


def outside_body_us(tensors: int, steps: int, emergency: bool | None) -> float:
    """Microseconds per step spent outside the loop body: with a session, or (None) a plain range()."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(tensors // 2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randn(4, 8)
    config = SessionConfig.from_mapping(
        {"checkpoint": {"every_steps": None, "emergency": bool(emergency)}, "divergence": {"enabled": False}}
    )
    with tempfile.TemporaryDirectory() as run_dir:
        session = Session(run_dir, config)
        session.open()
        session.prepare()
        session.register(model=model, optimizer=optimizer)
        report = session.report if emergency is not None else lambda **_: None
        body_s = 0.0
        started = time.perf_counter()
        for _ in session.steps(steps) if emergency is not None else range(steps):
            t = time.perf_counter()
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            value = loss.item()
            body_s += time.perf_counter() - t
            report(loss=value)
        total_s = time.perf_counter() - started
        session.close()
    return (total_s - body_s) / steps * 1e6


def warm_us(tensors: int, emergency: bool, calls: int = 3000) -> float:
    """Microseconds per step of the session's own calls (start, end, report) back to back on a live session."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(tensors // 2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()  # the optimizer's state exists, as in a running loop
    config = SessionConfig.from_mapping(
        {"checkpoint": {"every_steps": None, "emergency": emergency}, "divergence": {"enabled": False}}
    )
    with tempfile.TemporaryDirectory() as run_dir:
        session = Session(run_dir, config)
        session.open()
        session.prepare()
        session.register(model=model, optimizer=optimizer)
        steps = session.steps(calls + 1)
        next(steps)
        started = time.perf_counter()
        for _ in range(calls):
            session.report(loss=1.0)
            next(steps)
        elapsed = time.perf_counter() - started
        session.close()
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"session overhead per step, {args.tensors} parameter tensors + AdamW, {args.steps} steps x {args.repeats}")
    runs: dict[bool | None, list[float]] = {True: [], False: [], None: []}
    for _ in range(args.repeats):  # the three loops take turns
        for emergency in runs:
            runs[emergency].append(outside_body_us(args.tensors, args.steps, emergency))
    bare = statistics.median(runs[None])
    print("in a training loop (the session's calls run right after each step's tensor work):")
    print(f"  outside the body of a plain loop: {bare:.1f} us/step (the harness; subtracted below)")
    for emergency in (True, False):
        median = statistics.median(runs[emergency]) - bare
        print(
            f"  emergency checkpoints {'on ' if emergency else 'off'}: {median:7.1f} us/step median "
            f"({median / 200:.2f}x the 200 us goal; {median / 1e3 / 100 * 100:.3f}% of a 100 ms step)  "
            f"runs: {', '.join(f'{r:.0f}' for r in runs[emergency])}"
        )
    for emergency in (True, False):
        warm = statistics.median(warm_us(args.tensors, emergency) for _ in range(args.repeats))
        print(
            f"  warm, back to back, emergency {'on ' if emergency else 'off'}: {warm:7.1f} us/step "
            f"({warm / 200:.2f}x the 200 us goal)"
        )


if __name__ == "__main__":
    main()
