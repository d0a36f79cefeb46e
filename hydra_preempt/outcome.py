"""How a run ended: its status and the process exit code that tells it to a scheduler or a shell."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .rundir import JobIdentity


class Status(str, enum.Enum):
    FINISHED = "finished"
    PREEMPTED = "preempted"  # state saved; run again (requeue) to continue
    TIMEOUT = "timeout"  # stopped before the time limit, state saved; requeue to continue
    CANCELLED = "cancelled"  # state saved; the user asked to stop, no requeue
    DIVERGED = "diverged"  # stopped by the divergence detector; best checkpoints kept
    HANG = "hang"  # the watchdog saw no progress: stacks dumped, nothing saved, restart from the last checkpoint
    FAILED = "failed"


class ExitCode(enum.IntEnum):
    FINISHED = 0
    FAILED = 1  # also Python's own code for an uncaught exception
    USAGE = 2  # bad configuration or input; nothing was changed
    DIVERGED = 3
    REQUEUE = 75  # EX_TEMPFAIL: saved, run again to resume
    HANG = 76  # the watchdog ended a hung process: nothing saved, run again to resume from the last checkpoint
    CANCELLED = 130  # 128 + SIGINT: saved, do not requeue


EXIT_CODES = {
    Status.FINISHED: ExitCode.FINISHED,
    Status.PREEMPTED: ExitCode.REQUEUE,
    Status.TIMEOUT: ExitCode.REQUEUE,
    Status.CANCELLED: ExitCode.CANCELLED,
    Status.DIVERGED: ExitCode.DIVERGED,
    Status.HANG: ExitCode.HANG,
    Status.FAILED: ExitCode.FAILED,
}


@dataclass
class Outcome:
    status: Status
    step: int
    exit_code: int
    message: str = ""
    result: Any = None
    signal: str | None = None  # the signal that stopped the run, if one did
    signal_time: float | None = None  # when it arrived (time.time())
    run_dir: str | None = None
    requeue_by: str | None = None  # under SLURM: "self", "slurm" or "none" (requeue.Requeuer)
    kill_deadline: float | None = None  # under SLURM: when the job will be killed (time.time())
    job: JobIdentity | None = None  # the job and start that ran, for the run log of what follows
    failure: str | None = None  # a failure's class (slurm/failures.py), with the evidence and the restart decision
    evidence: str | None = None
    restart_reason: str | None = None
