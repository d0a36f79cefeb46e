"""A user's own script with DataLoader workers, stopped by SIGTERM to its whole process group (as
slurmstepd signals every process of a job step) at 3 points mid-epoch, many times over.

    python -m tests.integration.group_stop_repeat [--runs 10] [--loaders plain,persistent,stateful]

Each trial runs tests/integration/own_script.py with 2 workers: 3 starts each signalled through its
process group once it prints step 4, 13 and 27 (of 10-batch epochs), then a start that finishes. A
trial passes when every stopped start exits 75, the last exits 0, no process of any start is left
after it, and the result equals an uninterrupted run's. Prints one line per loader and
'N passed, M failed'; exits 1 if any trial failed. (`make group-stop-check`; CI runs one trial of
each loader kind in-process: test_own_script.py.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from hydra_preempt import ExitCode
from tools.train_process import run_signalled

ROOT = Path(__file__).resolve().parents[2]
STOPS = (4, 13, 27)


def own_script(run_dir: Path, loader: str, stop_at: int | None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "tests.integration.own_script", str(run_dir), "--workers", "2", "--loader", loader]
    return run_signalled(cmd, stop_at, ROOT, timeout=120)


def trial(base: Path, loader: str, reference: dict) -> str | None:
    """Why this trial failed, or None."""
    for stop in STOPS:
        try:
            code, err = own_script(base, loader, stop)
        except RuntimeError as e:  # a process of the run was left behind
            return str(e).splitlines()[0]
        if code != ExitCode.REQUEUE:
            return f"stopped at step {stop}: exit {code}: {err.strip().splitlines()[-1:]}"
    code, err = own_script(base, loader, None)
    if code != ExitCode.FINISHED:
        return f"last start: exit {code}: {err.strip().splitlines()[-1:]}"
    result = json.loads((base / "result.json").read_text())
    return None if result == reference else f"result {result} differs from {reference}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--loaders", default="plain,persistent,stateful")
    args = parser.parse_args()
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="group-stop-") as tmp:
        for loader in args.loaders.split(","):
            started = time.monotonic()
            code, err = own_script(Path(tmp) / f"{loader}-reference", loader, None)
            if code != 0:
                print(f"{loader}: the uninterrupted run failed: {err}", flush=True)
                return 1
            reference = json.loads((Path(tmp) / f"{loader}-reference" / "result.json").read_text())
            why = [trial(Path(tmp) / f"{loader}-{i}", loader, reference) for i in range(args.runs)]
            bad = [w for w in why if w]
            passed, failed = passed + len(why) - len(bad), failed + len(bad)
            print(
                f"{loader}: {len(why) - len(bad)} of {len(why)} exact ({time.monotonic() - started:.0f} s)", flush=True
            )
            for reason in bad:
                print(f"  {reason}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
