"""train.py as a child process: start it, wait for a step, signal it, collect its exit code.

Used by the demo and by the integration tests: real processes, real signals.
Tooling of this repository, not of the library: it finds train.py beside it.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from hydra_preempt.errors import HydraPreemptError
from hydra_preempt.rundir import read_result

_STEP = re.compile(r"^step (\d+) ")


def find_train_script() -> Path:
    """train.py of the repository this package is installed from (editable install)."""
    candidates = [Path(__file__).resolve().parents[1] / "train.py", Path.cwd() / "train.py"]
    for path in candidates:
        if path.is_file():
            return path
    raise HydraPreemptError("cannot find train.py: run this from a clone of the hydra_preempt repository")


class TrainProcess:
    def __init__(self, run_dir: Path, overrides: Sequence[str] = (), script: Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.script = script or find_train_script()
        self.args = [sys.executable, str(self.script), f"hydra.run.dir={self.run_dir}", *overrides]
        self.lines: list[str] = []
        self.last_step = 0
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._proc: subprocess.Popen | None = None

    def start(self) -> TrainProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=self.script.parent
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self._proc and self._proc.stdout
        for line in self._proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _take(self, timeout: float) -> str | None:
        line = self._queue.get(timeout=timeout)
        if line is not None:
            self.lines.append(line)
            if m := _STEP.match(line):
                self.last_step = int(m[1])
        return line

    def wait_for_step(self, step: int, timeout: float = 120.0) -> int:
        """Block until the process prints a step >= `step`; return the step seen."""
        self._wait_until(lambda: self.last_step >= step, f"step {step}", timeout)
        return self.last_step

    def wait_for_line(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Block until a line of output matches `pattern` (searched anywhere in the line)."""
        regex = re.compile(pattern)
        scanned = 0
        found: re.Match | None = None

        def matched() -> bool:
            nonlocal scanned, found
            while found is None and scanned < len(self.lines):
                found = regex.search(self.lines[scanned])
                scanned += 1
            return found is not None

        self._wait_until(matched, pattern, timeout)
        assert found is not None
        return found

    def _wait_until(self, done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {what!r} within {timeout} s; output:\n" + self.output)
            try:
                if self._take(remaining) is None:
                    raise RuntimeError(f"train.py exited before {what!r}; output:\n" + self.output)
            except queue.Empty:
                continue

    def send(self, sig: signal.Signals) -> None:
        assert self._proc
        self._proc.send_signal(sig)

    def wait(self, timeout: float = 300.0) -> int:
        assert self._proc
        rc = self._proc.wait(timeout=timeout)
        while self._take(timeout=10) is not None:
            pass
        return rc

    def run(self, timeout: float = 300.0) -> int:
        return self.start().wait(timeout)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def result(self) -> dict:
        result = read_result(self.run_dir)
        if result is None:
            raise HydraPreemptError(f"no result.json in {self.run_dir}; output:\n{self.output}")
        return result


def run_signalled(
    cmd: Sequence[str], stop_at: int | None = None, cwd: Path | None = None, timeout: float = 300
) -> tuple[int, str]:
    """Run `cmd`, which prints "step N" lines on stdout; send it SIGTERM once it prints `step stop_at`.

    Returns its exit code and its stderr (stdout holds the step lines)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    err: list[str] = []
    stderr = proc.stderr
    drain = threading.Thread(target=lambda: err.extend(stderr), daemon=True)  # a full pipe would block it
    drain.start()
    for line in proc.stdout:
        if stop_at is not None and line.strip() == f"step {stop_at}":
            proc.send_signal(signal.SIGTERM)
            stop_at = None
    proc.wait(timeout=timeout)
    drain.join(timeout)
    return proc.returncode, "".join(err)
