"""Run chosen tests several times in a row beside CPU hogs: a test that passes only on an idle
machine fails here before it fails in CI.

    make flaky-check                                      (the tests that wait on time, signals,
                                                           threads or SLURM, 5 runs, a hog per core)
    python -m tools.flaky_check [--runs 5] [--hogs N] [--workers 4] [PYTEST_ARGS...]

Each run is one `pytest -n WORKERS` over the same selection; the hogs are busy Python processes,
one per core by default, started before the first run and killed after the last. It prints one
line per run and exits 1 if any run failed, naming the tests that did.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

# The tests that use timing, signals, threads or SLURM: the slow-marked ones (real processes and
# the cluster) and the unit tests that start threads.
DEFAULT_SELECTION = [
    "tests/e2e",
    "tests/integration",
    "tests/unit/test_writer_thread.py",
    "tests/unit/test_watchdog.py",
    "tests/unit/test_progress.py",
]

_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def start_hogs(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run_once(pytest_args: list[str], workers: int) -> tuple[int, list[str], float]:
    started = time.monotonic()
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers), *pytest_args]
    done = subprocess.run(args, capture_output=True, text=True)
    return done.returncode, sorted(set(_FAILED.findall(done.stdout))), time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy processes beside the tests")
    parser.add_argument("--workers", type=int, default=4, help="pytest-xdist workers, as make test")
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = pytest_args or DEFAULT_SELECTION
    hogs = start_hogs(args.hogs)
    failures: dict[str, int] = {}
    bad_runs = 0
    try:
        for run in range(1, args.runs + 1):
            rc, failed, seconds = run_once(pytest_args, args.workers)
            bad_runs += rc != 0
            for test in failed:
                failures[test] = failures.get(test, 0) + 1
            verdict = "passed" if rc == 0 else f"exit {rc}: " + (", ".join(failed) or "no failed test named")
            print(f"run {run}/{args.runs} with {args.hogs} hog(s): {verdict} ({seconds:.0f} s)", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    for test, count in sorted(failures.items()):
        print(f"FLAKY {test}: failed {count} of {args.runs} runs")
    return 1 if bad_runs else 0


if __name__ == "__main__":
    sys.exit(main())
