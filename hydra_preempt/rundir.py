"""The run directory: a run's identity across requeues, and the one owner of its files.

    RUN_DIR/
      checkpoints/     checkpoint.dir by default (see checkpoint/store.py)
      run_log.jsonl    one JSON line per start, stop and requeue of the run
      metrics.jsonl    one JSON line per report() of rank 0, up to the step the run continues from
      result.json      written atomically when training finished
      run_id           the run's stable id, made at its first start (trackers resume with it)
      .run.lock        held (flock) by the one live process of the run

The run directory, not the job id, is a run's identity: the run log
survives requeues (new job ids on some sites) and shows every restart with
its reason. `RunHistory` is the one reader of the run log; everything that
counts starts or stops uses it.

A full disk never turns these files into a traceback or costs training:
a run log event that cannot be appended is reported in one line and the run
goes on (its outcome stands); metrics.jsonl stops being written after one
warning (each checkpoint's manifest carries the metrics of its step);
result.json raises RunDirWriteError, one line, for the session to report.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import itertools
import json
import logging
import os
import re
import socket
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeGuard

from .errors import CheckpointDirError, ConfigError, RunDirWriteError
from .fsutil import (
    append_line_durably,
    atomic_write_text,
    disk_full_hint,
    open_append,
    open_regular,
    open_regular_fd,
    read_regular,
)

RUN_LOG = "run_log.jsonl"
METRICS_LOG = "metrics.jsonl"
RESULT_FILE = "result.json"
RUN_LOCK = ".run.lock"
RUN_ID_FILE = "run_id"
_RUN_ID = re.compile(r"[0-9a-f]{32}")

log = logging.getLogger("hydra_preempt")


def _write_failure(path: Path, what: str, e: OSError) -> str:
    """One line naming the file and why: 'could not append to run_log.jsonl (disk full): ...'."""
    return f"could not {what} {path}{disk_full_hint(e)}: {e.strerror or e}"


def create_run_dir(path: Path | str) -> Path:
    """Create the run directory and its parents; CheckpointDirError naming it when it cannot be used."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointDirError(f"run directory {path} is not usable: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CheckpointDirError(f"run directory {path} is not usable: not writable")
    return path


@dataclass(frozen=True)
class JobIdentity:
    """Which job and which start of it wrote an event (the scheduler's view; None outside a job)."""

    job_id: str | None = None
    restart_count: int = 0

    def fields(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "restart_count": self.restart_count,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }


class RunLog:
    """Appends events to the run log, each durably (it survives a SIGKILL right after)."""

    def __init__(self, run_dir: Path | str, identity: JobIdentity | None = None) -> None:
        self.path = Path(run_dir) / RUN_LOG
        self.identity = identity or JobIdentity()

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        record = {"event": event, "time": now, **self.identity.fields(), **fields}
        try:
            append_line_durably(self.path, json.dumps(record))
        except OSError as e:  # the run's own outcome stands: say what the log misses
            log.error("%s; the %r event is not in the run log", _write_failure(self.path, "append to", e), event)
        return record


def read_events(run_dir: Path | str) -> list[dict[str, Any]]:
    """All events of the run log, oldest first."""
    return [e for e in _read_json_lines(Path(run_dir) / RUN_LOG) if isinstance(e.get("event"), str)]


def _end_of_last_line_up_to(fd: int, size: int, step: int, block: int = 1 << 16) -> int:
    """The offset just after the last complete line of a metrics file whose record has a `step` of at
    most `step` (0 if none), read backwards from `size`, `block` bytes at a time."""
    end, carry = size, b""  # carry: the bytes from `end` to the first newline after it (seen, not judged)
    while end > 0:
        start = max(0, end - block)
        data = os.pread(fd, end - start, start) + carry
        end = start
        if start > 0:
            first_newline = data.find(b"\n")
            if first_newline < 0:  # one long line so far: read further back
                carry = data
                continue
            carry, region, base = data[: first_newline + 1], data[first_newline + 1 :], start + first_newline + 1
        else:
            carry, region, base = b"", data, 0
        lines = region.split(b"\n")[:-1]  # each followed by a newline; what follows the last one is cut short
        ends = list(itertools.accumulate(len(line) + 1 for line in lines))
        for line, line_end in zip(reversed(lines), reversed(ends)):
            found = _step_of(line)
            if found is not None and found <= step:
                return base + line_end
    return 0


def _step_of(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    value = record.get("step") if isinstance(record, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file of JSON lines; a line cut short by a kill (or anything else) is skipped."""
    try:
        f, _ = open_regular(path)
        with f:
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as e:  # a FIFO or a symlink in its place: never block on it or follow it
        log.warning("%s cannot be read: %s", path, e.strerror or e)
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


@dataclass(frozen=True)
class RunHistory:
    """What the run log says about a run: its starts, its stops and where it stands."""

    events: tuple[dict[str, Any], ...]

    @classmethod
    def read(cls, run_dir: Path | str) -> RunHistory:
        return cls(tuple(read_events(run_dir)))

    @property
    def starts(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "start"]

    @property
    def stops(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "stop"]

    @property
    def restarts(self) -> int:
        """How many times the run was started before its latest start."""
        return max(0, len(self.starts) - 1)

    def stop_count(self, reason: str) -> int:
        return sum(1 for e in self.stops if e.get("reason") == reason)

    def failure_count(self, failure: str) -> int:
        """Ends of the run classified as this failure class (slurm/failures.py), by the run itself (its stop)
        or by the monitor (a `failure` event): the class's restart attempts so far."""
        return sum(1 for e in self.events if e["event"] in ("stop", "failure") and e.get("failure") == failure)

    def interruptions(self) -> list[tuple[int, str]]:
        """(step the next start resumed from, why the run stopped) for every stop that another start
        followed, oldest first: where a plot of the run marks its restarts. The step is the one the
        next start's own stop says it resumed from, else the stopped run's last checkpoint. A start
        without a stop before it (the process was killed without a word) counts, as "killed"."""
        marks: list[tuple[int, str]] = []
        last_stop: dict[str, Any] | None = None
        waiting: int | None = None  # the mark whose start has not stopped yet
        started = False
        for event in self.events:
            if event["event"] == "stop":
                resumed = event.get("resumed_from")
                if waiting is not None and _is_step(resumed):
                    marks[waiting] = (resumed, marks[waiting][1])
                waiting, last_stop = None, event
            elif event["event"] == "start":
                if started:
                    step = last_stop.get("checkpoint_step") if last_stop else None
                    reason = str(last_stop.get("failure") or last_stop.get("reason")) if last_stop else "killed"
                    marks.append((step if _is_step(step) else 0, reason))
                    waiting = len(marks) - 1
                started, last_stop = True, None
        return marks

    @property
    def status(self) -> str:
        """'not started', 'running' (a start without a stop: running, or killed without a word),
        or the reason of the last stop."""
        life = [e for e in self.events if e["event"] in ("start", "stop")]
        if not life:
            return "not started"
        return "running" if life[-1]["event"] == "start" else str(life[-1].get("reason"))

    @property
    def last_stop(self) -> dict[str, Any] | None:
        return self.stops[-1] if self.stops else None

    @property
    def checkpoint_dir(self) -> Path | None:
        """The checkpoint directory the latest start used."""
        found = next((e.get("checkpoint_dir") for e in reversed(self.starts) if e.get("checkpoint_dir")), None)
        return Path(found) if isinstance(found, str) else None


def checkpoint_dir_of(run_dir: Path | str) -> Path:
    """The checkpoint directory of the run in `run_dir`, found from `run_dir` itself.

    The run log records the directory the latest start used and the run directory it ran in: a
    checkpoint directory inside the run directory is taken relative to `run_dir` (the run was moved
    or copied: the copy's own checkpoints), one outside it as recorded (an absolute checkpoint.dir).
    A log written before the run directory was recorded names only an absolute path: if it is
    outside `run_dir` and `run_dir` holds a directory of the same name, which one is meant is
    ambiguous (ConfigError). No start recorded: RUN_DIR/checkpoints."""
    run_dir = Path(run_dir)
    start = next(
        (e for e in reversed(RunHistory.read(run_dir).starts) if isinstance(e.get("checkpoint_dir"), str)), None
    )
    if start is None:
        return run_dir / "checkpoints"
    recorded = Path(start["checkpoint_dir"])
    if isinstance(start.get("run_dir"), str):
        try:
            return run_dir / recorded.relative_to(start["run_dir"])
        except ValueError:
            return recorded
    here = run_dir.absolute()
    if recorded.is_relative_to(here) or recorded.is_relative_to(here.resolve()):
        return recorded
    local = run_dir / recorded.name
    if local.is_dir() and recorded.is_dir():
        raise ConfigError(
            f"the run log of {run_dir} names checkpoint directory {recorded}, and {local} exists too: "
            "which one holds this run's checkpoints is ambiguous; move the one that is not this run's away"
        )
    return local if local.is_dir() else recorded


def read_result(run_dir: Path | str) -> dict[str, Any] | None:
    """result.json of a finished run, or None (missing or unreadable)."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def _plain(value: Any) -> Any:
    """A JSON value for what json cannot write: a tensor's or array's numbers, else its text."""
    tolist = getattr(value, "tolist", None)  # torch tensors, NumPy arrays and scalars
    return tolist() if callable(tolist) else str(value)


def _string_keys(value: Any) -> Any:
    """Mappings with str keys at every depth: JSON's keys are strings, and sorting mixed keys (0 and
    'loss') would fail after the run's work is done."""
    if isinstance(value, dict):
        return {str(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_string_keys(v) for v in value]
    return value


def write_result(run_dir: Path | str, result: dict[str, Any]) -> Path:
    path = Path(run_dir) / RESULT_FILE
    try:
        atomic_write_text(path, json.dumps(_string_keys(result), indent=1, sort_keys=True, default=_plain))
    except OSError as e:
        raise RunDirWriteError(_write_failure(path, "write", e)) from None
    return path


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """Every metrics record of the run, oldest first."""
    return _read_json_lines(Path(run_dir) / METRICS_LOG)


class MetricsLog:
    """RUN_DIR/metrics.jsonl, appended one line per report; the file stays open (opening it for every
    line cost ~50 us a step), each line is flushed as it is written. A start rewinds it to the step it
    continues from: the lines of steps that are made again (after a SIGKILL, a hang, a checkpoint that
    failed verification) are dropped, so that each step has the lines of the run that went on.

    A write that fails (disk full) is warned about once and the log is given up for this process:
    training goes on, and each checkpoint's manifest still carries the metrics of its step."""

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / METRICS_LOG
        self._file: Any = None
        self._failed = False

    def rewind(self, step: int) -> None:
        """Cut the file after its last line of a step up to `step`: the lines after it are of steps made
        again (and of a line cut short by a kill, to which the next would be glued). Read from the end,
        a block at a time, and cut in place: no copy, no space needed on a full disk, and a long run's
        file is not read whole at every start. Called before anything is appended by this start."""
        self.close()
        try:
            fd = open_regular_fd(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        except OSError as e:  # a symlink or FIFO in its place: never followed, append() says so
            log.warning("%s cannot be rewound: %s", self.path, e.strerror or e)
            return
        try:
            size = os.fstat(fd).st_size
            keep = _end_of_last_line_up_to(fd, size, step)
            if keep < size:
                os.ftruncate(fd, keep)
        except OSError as e:
            self._failed = True
            log.warning("%s; metrics are no longer written there by this process", _write_failure(self.path, "cut", e))
        finally:
            os.close(fd)

    def append(self, record: dict[str, Any]) -> None:
        if self._failed:
            return
        try:
            if self._file is None:
                self._file = open_append(self.path, buffering=1)  # closed in close()
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:
            self._failed = True
            log.warning(
                "%s; metrics are no longer written there by this process (training goes on, "
                "checkpoints still carry the metrics of their step)",
                _write_failure(self.path, "append to", e),
            )
            self.close()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):  # a line that could not be written: append() has said so
                file.close()


class RunLock:
    """One live process per run directory (an advisory flock on RUN_DIR/.run.lock).

    A second process (a duplicate job, e.g. after an interrupted workflow was
    started again) waits until the first one ends, then resumes from its state.
    A process forked while the lock is held (a DataLoader worker) closes its copy of the
    descriptor at once: a flock belongs to the descriptor, so a persistent worker that outlives
    its run would otherwise hold the run directory from the next start.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / RUN_LOCK
        self._fd: int | None = None
        self._closes_in_children = False

    def acquire(
        self, give_up: Callable[[], bool], on_wait: Callable[[str], None], poll_s: float = 2.0, identity: str = ""
    ) -> bool:
        """Take the lock, waiting while another process holds it; False if `give_up()` turned true first.

        `on_wait(holder)` is called when waiting starts and whenever the holder's description changes; it
        may raise to refuse waiting. The holder is described as "HOST pid PID" + `identity`.
        """
        try:
            fd = open_regular_fd(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as e:  # a symlink there could point at any file, which the lock would overwrite
            raise CheckpointDirError(f"run directory {self.path.parent} is not usable: {e.strerror or e}") from None
        announced = None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    if holder != announced:  # read again each round: the holder writes it just after its flock
                        on_wait(holder)
                        announced = holder
                    if give_up():
                        os.close(fd)
                        return False
                    time.sleep(poll_s)
        except BaseException:  # on_wait refused to wait
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # who holds it only informs a waiting process: a full disk may drop it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}{identity}".encode(), 0)
        self._fd = fd
        if not self._closes_in_children:
            os.register_at_fork(after_in_child=functools.partial(_forget_in_child, weakref.ref(self)))
            self._closes_in_children = True
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _forget_in_child(lock: weakref.ref[RunLock]) -> None:
    """In a forked child: close the copy of the parent's lock descriptor (the parent keeps the lock)."""
    held = lock()
    if held is not None and held._fd is not None:
        with contextlib.suppress(OSError):
            os.close(held._fd)
        held._fd = None


def run_id(run_dir: Path | str, create: bool = True) -> str:
    """The run's stable id, kept in RUN_DIR/run_id: made at the first start (with `create`, under the
    run lock), the same after every requeue. Raises CheckpointDirError if the file is not a run id."""
    path = Path(run_dir) / RUN_ID_FILE
    try:
        text = read_regular(path, 64).decode(errors="replace").strip()
    except FileNotFoundError:
        if not create:
            raise CheckpointDirError(f"{path} does not exist: the run was never started") from None
        text = uuid.uuid4().hex
        try:
            atomic_write_text(path, text + "\n")
        except OSError as e:
            raise CheckpointDirError(f"run directory {path.parent} is not usable: {e.strerror or e}") from None
        return text
    except OSError as e:
        raise CheckpointDirError(f"{path} cannot be read: {e.strerror or e}") from None
    if not _RUN_ID.fullmatch(text):
        raise CheckpointDirError(f"{path} holds no run id ({text[:40]!r}); restore it, or remove it to start a new run")
    return text


def remove_stale_temporaries(run_dir: Path | str) -> list[str]:
    """Files an atomic write left when it was killed (.NAME.tmp-PID); only under the run lock."""
    removed = []
    for entry in Path(run_dir).glob(".*.tmp-*"):
        if entry.is_file() or entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _is_step(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
