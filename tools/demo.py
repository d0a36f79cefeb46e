"""The local demo: a real training run is preempted by signals, resumes, and ends identical.

    make demo        (python -m tools.demo [--dir DIR] [--steps N])

1. trains train.py uninterrupted;
2. trains it again in another run directory, sending SIGTERM twice while it
   runs (each time it saves at the next step boundary and exits 75), and
   starting it again each time (it resumes at the exact step);
3. compares the final parameters' SHA-256 of both runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from hydra_preempt.outcome import ExitCode
from hydra_preempt.rundir import RunHistory

from .train_process import TrainProcess


def run_demo(base: Path, steps: int = 600) -> int:
    base = base / time.strftime("%Y%m%d-%H%M%S")
    overrides = [f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.step_sleep=0.002"]
    print(f"Run directories under {base}\n")

    print(f"1. uninterrupted run of {steps} steps ...", flush=True)
    reference = TrainProcess(base / "uninterrupted", overrides)
    if (rc := reference.run()) != ExitCode.FINISHED:
        print(reference.output)
        print(f"uninterrupted run failed with exit code {rc}")
        return 1

    print("2. the same run, preempted by SIGTERM twice ...", flush=True)
    preempted_dir = base / "preempted"
    # Off the checkpoint interval on purpose: the stop is not a periodic save.
    for signal_after in (steps // 3 + 7, 2 * steps // 3 + 11, None):
        proc = TrainProcess(preempted_dir, overrides).start()
        if signal_after is not None:
            seen = proc.wait_for_step(signal_after)
            proc.send(signal.SIGTERM)
            print(f"   sent SIGTERM after step {seen} was printed", flush=True)
        rc = proc.wait()
        history = RunHistory.read(preempted_dir)
        stop = history.stops[-1]
        print(
            f"   start {len(history.starts)}: resumed from step {stop['resumed_from'] or 0}, "
            f"stopped at step {stop['step']} ({stop['reason']}, exit code {rc})",
            flush=True,
        )
        expected = ExitCode.REQUEUE if signal_after is not None else ExitCode.FINISHED
        if rc != expected:
            print(proc.output)
            print(f"expected exit code {int(expected)}, got {rc}")
            return 1

    a, b = reference.result(), proc.result()
    same = a["params_sha256"] == b["params_sha256"]
    print("\n3. result")
    print(f"   uninterrupted: step {a['step']}, loss {a['loss']:.6f}, params_sha256 {a['params_sha256'][:16]}...")
    print(
        f"   preempted:     step {b['step']}, loss {b['loss']:.6f}, params_sha256 {b['params_sha256'][:16]}..., restarts {b['restarts']}"
    )
    print(f"   identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, default=Path("demo-runs"), help="where run directories go (default: demo-runs)"
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    args = parser.parse_args(argv)
    return run_demo(args.dir, args.steps)


if __name__ == "__main__":
    sys.exit(main())
