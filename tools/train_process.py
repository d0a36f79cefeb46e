"""train.py as a child process: start it, wait for a step, signal it, collect its exit code.

Used by the demo and by the integration tests: real processes, real signals. Each process starts a
session of its own and is signalled as slurmstepd signals a job step: its whole process group, its
DataLoader workers included; once it has exited, no process of that group may be left.
Tooling of this repository, not of the library: it finds train.py beside it.
"""

from __future__ import annotations

import contextlib
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
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=self.script.parent,
            start_new_session=True,
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
        """`sig` to every process of the run (its process group), as slurmstepd sends it."""
        assert self._proc
        signal_group(self._proc.pid, sig)

    def wait(self, timeout: float = 300.0) -> int:
        assert self._proc
        rc = self._proc.wait(timeout=timeout)
        while self._take(timeout=10) is not None:
            pass
        check_group_ended(self._proc.pid, self.output)
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
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    err: list[str] = []
    stderr = proc.stderr
    drain = threading.Thread(target=lambda: err.extend(stderr), daemon=True)  # a full pipe would block it
    drain.start()
    for line in proc.stdout:
        if stop_at is not None and line.strip() == f"step {stop_at}":
            signal_group(proc.pid, signal.SIGTERM)
            stop_at = None
    proc.wait(timeout=timeout)
    drain.join(timeout)
    check_group_ended(proc.pid, "".join(err))
    return proc.returncode, "".join(err)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """`sig` to every process of process group `pgid` (a process started with start_new_session leads
    the group of its pid)."""
    with contextlib.suppress(ProcessLookupError):  # the whole group has ended already
        os.killpg(pgid, sig)


def signal_like_slurmstepd(sig: signal.Signals = signal.SIGTERM) -> None:
    """From inside a run: `sig` to this process and every process it started (DataLoader and pool
    workers, subprocesses), sent by another process, as slurmstepd signals every process of a job step."""
    pids = [os.getpid(), *descendants(os.getpid())]
    subprocess.run(["kill", f"-{sig.name.removeprefix('SIG')}", *map(str, pids)], check=True)


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, 'PID COMMAND') of every live process (from /proc; no zombies)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), f"{stat.parent.name} {name}")
    return table


def descendants(pid: int) -> list[int]:
    table = _processes()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, (parent, _, _) in table.items() if parent in frontier]
        found += children
        frontier = children
    return found


def group_members(pgid: int) -> list[str]:
    """'PID COMMAND' of each live process of process group `pgid`."""
    return [name for _, group, name in _processes().values() if group == pgid]


def check_group_ended(pgid: int, output: str, wait_s: float = 10.0) -> None:
    """Raise if a process of the run's group outlives it by `wait_s` (a DataLoader worker ends within
    torch's 5 s check of its parent); the ones left are killed first."""
    deadline = time.monotonic() + wait_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        signal_group(pgid, signal.SIGKILL)
        raise RuntimeError(f"processes of the run left after it exited: {left}; output:\n{output}")


def run_stopper(directory: Path, stop_at: int, *more: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python stopper.py STOP_AT MORE...` in `directory` (a test's program with a callback that sends
    SIGTERM to its process group at that step), in a process group of its own, as a job step's."""
    return subprocess.run(
        [sys.executable, "stopper.py", str(stop_at), *more],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def newest_checkpoint(run_dir: Path) -> dict:
    """The state tree of the newest checkpoint in RUN_DIR/checkpoints, verified."""
    from hydra_preempt.checkpoint.layout import read_manifest
    from hydra_preempt.checkpoint.writer import read_checkpoint_files

    newest = max((run_dir / "checkpoints").glob("step-*"))
    return read_checkpoint_files(newest, read_manifest(newest))


def sweep_stopped_once(directory: Path, files: dict[str, str]) -> Path:
    """`python app.py -m hydra/launcher=preempt_local` in `directory`, made with `files` (name: text): a
    Hydra app whose one job stops itself once (and touches DIRECTORY/stopped) and is continued by the
    launcher. The job's run directory."""
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    sweep = [sys.executable, "app.py", "-m", "hydra/launcher=preempt_local", f"hydra.sweep.dir={directory / 'sweep'}"]
    done = subprocess.run(sweep, cwd=directory, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and (directory / "stopped").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return directory / "sweep" / "0"
