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
from ..fsutil import atomic_write_text, open_regular_fd
from ..rundir import RUN_LOG, RunHistory, RunLog
from ..slurm.commands import SlurmError, requeue_job, sacct_runs, show_job, state_outcome
from ..slurm.failures import NO_STOP, FailureTable, classify, decide
from .hydra_sweep import MANIFEST, load_manifest

STATE_FILE = ".monitor-state.json"
LOCK_FILE = ".monitor.lock"
# How much of the end of a job's log the patterns see (the log of every start, appended).
LOG_TAIL_BYTES = 256 * 1024
_ACTIVE = ("waiting", "running", "held")
# A restart whose `scontrol requeue` failed this many times in a row is given up (the controller
# forgot the job, MinJobAge, or the job may not be requeued): the monitor settles and says so.
MAX_REQUEUE_ERRORS = 3
# A job SLURM gives no usable answer about (sacct prints nothing, or lines that cannot be read)
# this many polls in a row is no longer followed: the monitor says so and does not wait for it.
UNKNOWN_PATIENCE = 10


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


@dataclass(frozen=True)
class JobRun:
    """The latest run of a job as the scheduler tells it."""

    state: str  # sacct's, or the controller's while it says the job is active
    exit_code: int | None
    runs: int  # how many runs the job had (a requeue adds one); 0: the accounting does not know it yet
    raw_id: str | None = None  # SLURM_JOB_ID inside the job (an array task's own number), as the run log has it


def run_events(history: RunHistory, run: JobRun) -> list[dict[str, Any]] | None:
    """The run log's events of this run of the job (from its start to the next start), or None if this
    run wrote no start (it never started: a launch failure; or it was cancelled while pending). Its
    start is the one with this job's id and restart count, so that an earlier run's stop, or an
    earlier job's, is never read as this run's."""
    events = list(history.events)
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    for n, i in enumerate(starts):
        start = events[i]
        if start.get("restart_count", 0) == run.runs - 1 and (
            run.raw_id is None or str(start.get("job_id")) == run.raw_id
        ):
            return events[i : starts[n + 1] if n + 1 < len(starts) else len(events)]
    return None


def parse_exit_code(value: str) -> int | None:
    """sacct's ExitCode 'code:signal' -> the code ('0:9' -> 0, a kill shows in the state)."""
    code = value.split(":")[0]
    return int(code) if code.isdecimal() else None


def judge(
    table: FailureTable,
    state: str,
    exit_code: int | None,
    history: RunHistory,
    log_text: str,
    attempt: list[dict[str, Any]] | None,
) -> Verdict:
    """What to do about a job whose latest run ended in `state`; `history` is its run log and
    `attempt` that run's part of it (run_events; None: the run never started)."""
    outcome = state_outcome(state)
    if outcome in _ACTIVE or outcome == "unknown":  # a state the table lacks: still there, not judged
        return Verdict("wait")
    if outcome == "elsewhere":
        return Verdict("done", reason=f"{state}: the federation runs it on another cluster, not followed here")
    stops = [e for e in attempt or [] if e["event"] == "stop"]
    last_stop = stops[-1] if stops else None
    reason = str(last_stop.get("reason")) if last_stop else NO_STOP if attempt is not None else None
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

    def latest(self, job_id: str) -> JobRun: ...

    def log_text(self, job_id: str, judged_up_to: dict[str, int]) -> str: ...

    def requeue(self, job_id: str) -> None: ...


class Slurm:
    def latest(self, job_id: str) -> JobRun:
        """The job's latest run: its state and exit code, how many runs it had, its raw id.

        The controller's state wins while it says the job is active: sacct shows a job that SLURM
        itself requeues after a preemption as PREEMPTED (COMPLETING, then PENDING, in scontrol) until
        its next run is recorded (measured: 14 s on the test cluster), which is no end to judge."""
        rows = sacct_runs(job_id)  # SlurmError for an answer that cannot be read
        try:
            info = show_job(job_id)
            live, live_code = info.state, info.fields.get("ExitCode", "")
        except SlurmError:  # the controller forgot it (MinJobAge): sacct is all there is
            live, live_code = "", ""
        if not rows:  # a pending array task, or the accounting lagging: the controller's word, if any
            return JobRun(live if state_outcome(live) in _ACTIVE else "UNKNOWN", None, 0)
        state, code, *raw = rows[-1]
        raw_id = raw[0] if raw and raw[0] else None
        if state_outcome(live) in _ACTIVE:
            return JobRun(live, None, len(rows), raw_id)
        if live and state_outcome(state) in _ACTIVE:
            # the controller saw the run end, the accounting has not recorded it yet (it lags under load):
            # the controller's end, so that the run is not taken for one still waiting (whose log
            # would be skipped as an older run's words)
            return JobRun(live, parse_exit_code(live_code), len(rows), raw_id)
        return JobRun(state, parse_exit_code(code), len(rows), raw_id)

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


def _lock(directory: Path) -> int:
    """Hold `directory`'s monitor lock (flock on LOCK_FILE, naming this process); MonitorBusyError if held."""
    fd = open_regular_fd(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # never through a planted link
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise MonitorBusyError(f"{directory} is already monitored by {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    return fd


class Monitor:
    """Watches one directory (a sweep or a run); holds its lock from construction until close().

    `jobs`: these jobs of the directory only (the Hydra launcher's, submitted now); default: all.
    `patience`: polls in a row without a usable answer from SLURM about a job before it is given up."""

    def __init__(
        self,
        path: Path,
        table: FailureTable,
        scheduler: Scheduler,
        jobs: list[Watched] | None = None,
        patience: int = UNKNOWN_PATIENCE,
    ) -> None:
        self.path = Path(path)
        self.jobs = watched_jobs(self.path) if jobs is None else jobs
        self.table = table
        self.scheduler = scheduler
        # The directory and every run directory it watches: a monitor of a sweep and another of one
        # of its runs would judge the same end twice and spend its restart budget twice.
        self._fds: list[int] = []
        try:
            for directory in dict.fromkeys([self.path, *(job.run_dir for job in self.jobs)]):
                if directory == self.path or directory.is_dir():  # a run that has not started has none yet
                    self._fds.append(_lock(directory))
        except MonitorBusyError:
            self.close()
            raise
        self.state_path = self.path / STATE_FILE
        try:
            self.state: dict[str, Any] = self._read_state()
        except HydraPreemptError:
            self.close()
            raise
        self._last_end: dict[str, str] = {}  # job id -> the end seen by the latest poll
        self.patience = patience
        self._unanswered: dict[str, int] = {}  # job id -> polls in a row without a usable answer
        self.given_up: list[Watched] = []  # jobs no longer followed: no usable answer for `patience` polls
        self._unknown_states: set[tuple[str, str]] = set()  # (end, state) already reported as unknown

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
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    @property
    def settled(self) -> bool:
        """Every job's latest end is judged and nothing is left to do (finished or stopped), or the job
        was given up (SLURM gave no usable answer about it for `patience` polls)."""
        return all(
            job in self.given_up
            or (
                (j := self.state["judged"].get(self._last_end.get(job.job_id, ""))) is not None
                and j["action"] != "restart"
            )
            for job in self.jobs
        )

    def poll(self, now: float | None = None) -> list[str]:
        """One round over the jobs: judge the ends not judged yet, requeue the restarts that are due.
        Returns one line per thing done."""
        now = time.time() if now is None else now
        lines = []
        for job in self.jobs:
            if job in self.given_up:
                continue
            try:
                lines += self._poll_job(job, now)
            except SlurmError as e:  # sacct failed, or its answer cannot be read
                lines.append(self._unanswered_line(job, str(e)))
        atomic_write_text(self.state_path, json.dumps(self.state, indent=1, sort_keys=True))
        return lines

    def _poll_job(self, job: Watched, now: float) -> list[str]:
        run = self.scheduler.latest(job.job_id)
        state = run.state
        if run.runs == 0:  # the accounting does not know the job (yet: sacct lags sbatch by a moment)
            if state_outcome(state) in _ACTIVE:  # the controller does: pending (an array task), not lost
                self._unanswered.pop(job.job_id, None)
                return []
            return [self._unanswered_line(job, "sacct knows no run of it")]
        self._unanswered.pop(job.job_id, None)
        end = self._last_end[job.job_id] = f"{job.job_id}/{run.runs}"  # one end per run of the job
        judged = self.state["judged"].get(end)
        log_offsets = self.state.setdefault("log_offsets", {})
        if judged is None:
            if state_outcome(state) == "waiting":  # the next run has not written yet: what is there is older
                self.scheduler.log_text(job.job_id, log_offsets)
            if state_outcome(state) in _ACTIVE:
                return []
            if state_outcome(state) == "unknown":
                if (end, state) in self._unknown_states:
                    return []
                self._unknown_states.add((end, state))
                return [f"job {job.job_id} ({job.run_dir}): state {state!r} is not one the monitor knows; not judged"]
            history = RunHistory.read(job.run_dir)
            log_text = self.scheduler.log_text(job.job_id, log_offsets)
            verdict = judge(self.table, state, run.exit_code, history, log_text, run_events(history, run))
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
            judgement = f": {verdict.failure} ({verdict.evidence})" if verdict.failure else ""
            lines = [f"job {job.job_id} ({job.run_dir}) ended {state}{judgement}; {verdict.reason}"]
        else:
            lines = []
        if judged["action"] == "restart" and not judged["requeued"] and now >= judged["due"]:
            if state_outcome(state) in _ACTIVE:  # it runs again already (SLURM's requeue, or a person's)
                judged["requeued"] = True
                lines.append(f"job {job.job_id} ({job.run_dir}): {state} again, not requeued")
                return lines
            try:
                self.scheduler.requeue(job.job_id)
            except SlurmError as e:
                judged["requeue_errors"] = judged.get("requeue_errors", 0) + 1
                if judged["requeue_errors"] < MAX_REQUEUE_ERRORS:  # tried again at the next poll
                    lines.append(f"job {job.job_id} ({job.run_dir}): {e}")
                    return lines
                judged["action"], judged["reason"] = "stop", f"not requeued: {e}"  # settled: resubmit it yourself
                RunLog(job.run_dir).append("requeue_failed", failure=judged["failure"], error=str(e), by="monitor")
                lines.append(f"job {job.job_id} ({job.run_dir}): {judged['reason']}; resubmit it")
                return lines
            judged["requeued"] = True
            RunLog(job.run_dir).append("requeue", by="monitor", failure=judged["failure"])
            lines.append(f"job {job.job_id} ({job.run_dir}): requeued")
        return lines

    def _unanswered_line(self, job: Watched, why: str) -> str:
        """One poll without a usable answer about `job`: counted; at `patience` in a row it is given up."""
        count = self._unanswered[job.job_id] = self._unanswered.get(job.job_id, 0) + 1
        if count < self.patience:
            return f"job {job.job_id} ({job.run_dir}): {why} (poll {count}/{self.patience} without an answer)"
        self.given_up.append(job)
        return (
            f"job {job.job_id} ({job.run_dir}): {why}, {count} polls in a row; no longer followed "
            f"(see `sacct -j {job.job_id}`)"
        )


def monitor(
    paths: list[Path],
    table: FailureTable,
    interval_s: float,
    once: bool,
    scheduler: Scheduler | None = None,
    patience: int = UNKNOWN_PATIENCE,
) -> int:
    """Watch every directory until all their jobs are settled (or one round with `once`); print what is
    done. 0 once every job is settled; 1 when SLURM gave no usable answer about some job for
    `patience` polls in a row (the last line names them)."""
    monitors: list[Monitor] = []
    try:
        for path in paths:
            monitors.append(Monitor(path, table, scheduler or Slurm(), patience=patience))
        while True:
            for m in monitors:
                for line in m.poll():
                    print(line, flush=True)
            if once:
                return 0
            if all(m.settled for m in monitors):
                lost = [job.job_id for m in monitors for job in m.given_up]
                if lost:
                    print(f"monitor: ended; SLURM gave no usable answer about job(s) {', '.join(lost)}", flush=True)
                    return 1
                return 0
            time.sleep(interval_s)
    finally:
        for m in monitors:
            m.close()
