"""What the session adds to every training step, checkpoints off.

    python benchmarks/step_overhead.py [--tensors 1000] [--width 8] [--steps 300] [--repeats 5] [--no-probe]

A model of `--tensors` parameter tensors (Linear layers of `--width` x
`--width`, weight and bias) and its AdamW: the loop body (forward, backward,
optimizer step, `session.report(loss=...)`'s argument) is timed from inside
the loop; the time outside the bodies is measured for the same loop over
`range()` too, and the session's share of each step (`steps()` between
yields and `report()`) is the difference. Emergency checkpoints on (the
default) and off; medians over repeats, in microseconds per step, against
the goal of 200 us (0.2% of a 100 ms step).

The probe. After a step has freed its thousands of small blocks, the first
request to glibc's malloc that no small bin serves (about 1 KB or more)
sorts every one of them into its bin: 60-90 us here, paid by whoever asks
first. A real step asks at once (its first activation); the toy model's
8x8 layers never do, so without a probe that cost lands on the session's
first allocation (torch's RNG state, 5 KB) in the session's loop and on
nobody in the plain loop, and counts as the session's. With the probe
(the default) every loop, plain or not, allocates 8 KB before its body,
outside the body's timer, as a real step's first activation would: the
sort is paid once per step in every loop, and the difference is what the
session adds. The probe's own median in each loop is printed: where the
session allocated first, the probe is cheap (the sort moved, it was not
added). `--no-probe` measures the old way.

Also the same session calls timed back to back on a live session (warm
caches). The difference matters on a small machine: the first Python code
after a step's heavy tensor work runs several times slower than the same
code run again (cold caches), a cost any code there pays.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from hydra_preempt.config import SessionConfig
from hydra_preempt.session.api import Session

PROBE_FLOATS = 2048  # 8 KB: a real step's first activation (see the module's docstring)


def outside_body_us(tensors: int, width: int, steps: int, emergency: bool | None, probe: bool) -> tuple[float, float]:
    """Microseconds per step spent outside the loop body (the probe included), and the probe's
    median: with a session, or (None) a plain range()."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(tensors // 2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randn(4, width)
    config = SessionConfig.from_mapping(
        {"checkpoint": {"every_steps": None, "emergency": bool(emergency)}, "divergence": {"enabled": False}}
    )
    probes: list[float] = []
    with tempfile.TemporaryDirectory() as run_dir:
        session = Session(run_dir, config)
        session.open()
        session.prepare()
        session.register(model=model, optimizer=optimizer)
        report = session.report if emergency is not None else lambda **_: None
        body_s = 0.0
        started = time.perf_counter()
        for _ in session.steps(steps) if emergency is not None else range(steps):
            if probe:
                p = time.perf_counter()
                first = torch.empty(PROBE_FLOATS)
                probes.append(time.perf_counter() - p)
                del first
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
    return (total_s - body_s) / steps * 1e6, statistics.median(probes) * 1e6 if probes else 0.0


def warm_us(tensors: int, width: int, emergency: bool, calls: int = 3000) -> float:
    """Microseconds per step of the session's own calls (start, end, report) back to back on a live session."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(tensors // 2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    model(torch.randn(4, width)).sum().backward()
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
    parser.add_argument("--width", type=int, default=8, help="each Linear layer is width x width")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-probe", dest="probe", action="store_false", help="no 8 KB allocation before each body")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"session overhead per step, {args.tensors} parameter tensors ({args.width}x{args.width} layers) + AdamW, "
        f"{args.steps} steps x {args.repeats}, {'with' if args.probe else 'without'} the probe"
    )
    runs: dict[bool | None, list[tuple[float, float]]] = {True: [], False: [], None: []}
    for _ in range(args.repeats):  # the three loops take turns
        for emergency in runs:
            runs[emergency].append(outside_body_us(args.tensors, args.width, args.steps, emergency, args.probe))
    bare = statistics.median(outside for outside, _ in runs[None])
    print("in a training loop (the session's calls run right after each step's tensor work):")
    print(
        f"  outside the body of a plain loop: {bare:.1f} us/step (the harness; subtracted below)"
        + (f"; its probe {statistics.median(p for _, p in runs[None]):.1f} us" if args.probe else "")
    )
    for emergency in (True, False):
        median = statistics.median(outside for outside, _ in runs[emergency]) - bare
        probe = f"; its probe {statistics.median(p for _, p in runs[emergency]):.1f} us" if args.probe else ""
        print(
            f"  emergency checkpoints {'on ' if emergency else 'off'}: {median:7.1f} us/step median "
            f"({median / 200:.2f}x the 200 us goal; {median / 1e3 / 100 * 100:.3f}% of a 100 ms step){probe}  "
            f"runs: {', '.join(f'{outside - bare:.0f}' for outside, _ in runs[emergency])}"
        )
    for emergency in (True, False):
        warm = statistics.median(warm_us(args.tensors, args.width, emergency) for _ in range(args.repeats))
        print(
            f"  warm, back to back, emergency {'on ' if emergency else 'off'}: {warm:7.1f} us/step "
            f"({warm / 200:.2f}x the 200 us goal)"
        )


if __name__ == "__main__":
    main()
