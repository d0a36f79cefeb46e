"""`hydra-preempt monitor`: follow the jobs of sweeps and runs, classify each end, restart per policy.

For every job it watches (a sweep directory's manifest, or a run directory's
latest start) the monitor asks sacct for the job's latest state. A job that
ended is judged once (`judge`, pure): its class (failures.classify over the
SLURM state, the exit code, the run log's last stop and the tail of the job's
log) and the restart policy's decision (failures.decide). A decision the job
made itself (a stop with `restart_reason` in the run log) is followed, not
made again. A restart is `scontrol requeue` of the same job after the
class's backoff: the same batch script, the same run directory, which
resumes from its last checkpoint. SLURM can requeue an ended job only while
the controller remembers it (MinJobAge, 300 s by default): poll more often.

Each watched directory holds the monitor's state (`.monitor-state.json`: the
ends judged, the restarts due) and its lock (`.monitor.lock`, flock): a
second monitor of the same directory is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import HydraPreemptError
from ..fsutil import atomic_write_text
from ..rundir import RUN_LOG, RunHistory, RunLog
from ..slurm.commands import SlurmError, requeue_job, sacct_states, show_job, state_outcome
from ..slurm.failures import NO_STOP, FailureTable, classify, decide
from .hydra_sweep import MANIFEST, load_manifest

STATE_FILE = ".monitor-state.json"
LOCK_FILE = ".monitor.lock"
# How much of the end of a job's log the patterns see (the log of every start, appended).
LOG_TAIL_BYTES = 256 * 1024
_ACTIVE = ("waiting", "running", "held")


class MonitorBusyError(HydraPreemptError):
    """Another monitor watches the directory."""


@dataclass(frozen=True)
class Watched:
    run_dir: Path
    job_id: str


@dataclass(frozen=True)
class Verdict:
    action: str  # "wait" (still active), "done" (finished, or nothing to do), "restart", "stop"
    failure: str = ""
    evidence: str = ""
    reason: str = ""
    backoff_s: float = 0.0
    record: bool = False  # the decision is the monitor's own: it goes into the run log


def latest_attempt(history: RunHistory) -> list[dict[str, Any]]:
    """The run log's events since the latest start."""
    events = list(history.events)
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    return events[starts[-1] :] if starts else []


def parse_exit_code(value: str) -> int | None:
    """sacct's ExitCode 'code:signal' -> the code ('0:9' -> 0, a kill shows in the state)."""
    code = value.split(":")[0]
    return int(code) if code.isdigit() else None


def judge(
    table: FailureTable, state: str, exit_code: int | None, history: RunHistory, log_text: str, started: bool = True
) -> Verdict:
    """What to do about a job in `state` (sacct's latest) whose run log is `history`.

    `started`: this attempt wrote a start into the run log (not so after a launch failure: the
    run log's last stop then belongs to an earlier attempt and says nothing about this one)."""
    if state_outcome(state) in _ACTIVE:
        return Verdict("wait")
    stops = [e for e in latest_attempt(history) if e["event"] == "stop"] if started else []
    last_stop = stops[-1] if stops else None
    reason = str(last_stop.get("reason")) if last_stop else NO_STOP if started else None
    if last_stop is not None and last_stop.get("restart_reason"):  # the job decided itself
        return Verdict(
            "restart" if last_stop.get("restart") is True else "stop",
            str(last_stop.get("failure", "")),
            str(last_stop.get("evidence", "")),
            f"decided by the job: {last_stop['restart_reason']}",
        )
    name, evidence = classify(table, state, exit_code, reason, log_text)
    if name == "finished":
        return Verdict("done", name, evidence, "finished")
    decision = decide(table, name, history.failure_count(name) + 1)
    action = "restart" if decision.restart else "stop"
    return Verdict(action, name, evidence, decision.reason, decision.backoff_s, record=True)


class Scheduler(Protocol):
    """What the monitor asks of SLURM (commands.py; a recording in tests)."""

    def latest(self, job_id: str) -> tuple[str, int | None, int]: ...

    def log_text(self, job_id: str, judged_up_to: dict[str, int]) -> str: ...

    def requeue(self, job_id: str) -> None: ...


class Slurm:
    def latest(self, job_id: str) -> tuple[str, int | None, int]:
        """The state and exit code of the job's latest run, and how many runs it had (requeues add one).

        The controller's state wins while it says the job is active: sacct shows a job that SLURM
        itself requeues after a preemption as PREEMPTED (COMPLETING, then PENDING, in scontrol) until
        its next run is recorded (measured: 14 s on the test cluster), which is no end to judge."""
        states = sacct_states(job_id)
        if not states:
            return "UNKNOWN", None, 0
        state, code = states[-1]
        try:
            live = show_job(job_id).state
        except SlurmError:  # the controller forgot it (MinJobAge): sacct is all there is
            live = ""
        if state_outcome(live) in _ACTIVE:
            return live, None, len(states)
        return state, parse_exit_code(code), len(states)

    def log_text(self, job_id: str, judged_up_to: dict[str, int]) -> str:
        """The job's stderr and stdout written since the last judged end (while the controller remembers
        where they are): each file from its offset in `judged_up_to` (path -> bytes; updated to the
        end), at most its last LOG_TAIL_BYTES. A log appended by every start of the job would
        otherwise show an earlier start's last words (an NCCL error) as this start's."""
        try:
            fields = show_job(job_id).fields
        except SlurmError:
            return ""
        texts = []
        for path in dict.fromkeys(p for p in (fields.get("StdErr"), fields.get("StdOut")) if p):
            with contextlib.suppress(OSError), open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = judged_up_to.get(path, 0)
                f.seek(max(start if start <= size else 0, size - LOG_TAIL_BYTES))  # smaller: a new file
                texts.append(f.read(size - f.tell()).decode(errors="replace"))
                judged_up_to[path] = size
        return "\n".join(texts)

    def requeue(self, job_id: str) -> None:
        requeue_job(job_id)


def watched_jobs(path: Path) -> list[Watched]:
    """The jobs of a sweep directory (its manifest) or of a run directory (its latest start)."""
    if (path / MANIFEST).is_file():
        return [
            Watched(Path(j.dir), j.job_id) for j in load_manifest(path).values() if j.job_id and j.cluster == "slurm"
        ]
    if (path / RUN_LOG).is_file():
        starts = RunHistory.read(path).starts
        job_id = starts[-1].get("job_id") if starts else None
        return [Watched(path, str(job_id))] if job_id else []
    raise HydraPreemptError(f"{path} is neither a sweep directory (no {MANIFEST}) nor a run directory (no {RUN_LOG})")


class Monitor:
    """Watches one directory (a sweep or a run); holds its lock from construction until close().

    `jobs`: these jobs of the directory only (the Hydra launcher's, submitted now); default: all."""

    def __init__(
        self, path: Path, table: FailureTable, scheduler: Scheduler, jobs: list[Watched] | None = None
    ) -> None:
        self.path = Path(path)
        self.jobs = watched_jobs(self.path) if jobs is None else jobs
        self.table = table
        self.scheduler = scheduler
        self._fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise MonitorBusyError(f"{self.path} is already monitored by {holder}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()}".encode(), 0)
        self.state_path = self.path / STATE_FILE
        try:
            self.state: dict[str, Any] = self._read_state()
        except HydraPreemptError:
            self.close()
            raise
        self._last_end: dict[str, str] = {}  # job id -> the end seen by the latest poll

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"judged": {}}
        except (OSError, ValueError) as e:
            raise HydraPreemptError(f"{self.state_path} is not a monitor state ({e}); move it aside") from None
        if not isinstance(state, dict) or not isinstance(state.get("judged"), dict):
            raise HydraPreemptError(f"{self.state_path} is not a monitor state; move it aside")
        return state

    def close(self) -> None:
        os.close(self._fd)

    @property
    def settled(self) -> bool:
        """Every job's latest end is judged and nothing is left to do (finished or stopped)."""
        return all(
            (j := self.state["judged"].get(self._last_end.get(job.job_id, ""))) is not None and j["action"] != "restart"
            for job in self.jobs
        )

    def poll(self, now: float | None = None) -> list[str]:
        """One round over the jobs: judge the ends not judged yet, requeue the restarts that are due.
        Returns one line per thing done."""
        now = time.time() if now is None else now
        lines = []
        for job in self.jobs:
            try:
                lines += self._poll_job(job, now)
            except SlurmError as e:
                lines.append(f"job {job.job_id} ({job.run_dir}): {e}")
        atomic_write_text(self.state_path, json.dumps(self.state, indent=1, sort_keys=True))
        return lines

    def _poll_job(self, job: Watched, now: float) -> list[str]:
        state, exit_code, runs = self.scheduler.latest(job.job_id)
        if runs == 0:  # the accounting does not know the job (yet: sacct lags sbatch by a moment)
            return []
        history = RunHistory.read(job.run_dir)
        end = self._last_end[job.job_id] = f"{job.job_id}/{runs}"  # one end per run of the job
        judged = self.state["judged"].get(end)
        if judged is None:
            if state_outcome(state) in _ACTIVE:
                return []
            starts_seen = self.state.setdefault("starts_seen", {})
            started = len(history.starts) > starts_seen.get(str(job.run_dir), 0)
            log_text = self.scheduler.log_text(job.job_id, self.state.setdefault("log_offsets", {}))
            verdict = judge(self.table, state, exit_code, history, log_text, started)
            starts_seen[str(job.run_dir)] = len(history.starts)
            if verdict.record:
                RunLog(job.run_dir).append(
                    "failure",
                    job_state=state,
                    failure=verdict.failure,
                    evidence=verdict.evidence,
                    restart_reason=verdict.reason,
                    by="monitor",
                )
            judged = {**asdict(verdict), "due": now + verdict.backoff_s, "requeued": False}
            self.state["judged"][end] = judged
            lines = [
                f"job {job.job_id} ({job.run_dir}) ended {state}: {verdict.failure} ({verdict.evidence}); {verdict.reason}"
            ]
        else:
            lines = []
        if judged["action"] == "restart" and not judged["requeued"] and now >= judged["due"]:
            if state_outcome(state) in _ACTIVE:  # it runs again already (SLURM's requeue, or a person's)
                judged["requeued"] = True
                lines.append(f"job {job.job_id} ({job.run_dir}): {state} again, not requeued")
                return lines
            self.scheduler.requeue(job.job_id)
            judged["requeued"] = True
            RunLog(job.run_dir).append("requeue", by="monitor", failure=judged["failure"])
            lines.append(f"job {job.job_id} ({job.run_dir}): requeued")
        return lines


def monitor(
    paths: list[Path], table: FailureTable, interval_s: float, once: bool, scheduler: Scheduler | None = None
) -> int:
    """Watch every directory until all their jobs are settled (or one round with `once`); print what is done."""
    monitors: list[Monitor] = []
    try:
        for path in paths:
            monitors.append(Monitor(path, table, scheduler or Slurm()))
        while True:
            for m in monitors:
                for line in m.poll():
                    print(line, flush=True)
            if once or all(m.settled for m in monitors):
                return 0
            time.sleep(interval_s)
    finally:
        for m in monitors:
            m.close()
