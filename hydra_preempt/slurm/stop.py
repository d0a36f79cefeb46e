"""What a stop was, and whether to requeue: pure functions over plain data.

A run stopped by a signal saved its state at a step boundary. What happens
next depends on what the signal meant:

- preempted: the scheduler set PreemptTime on the job.
  PreemptMode=CANCEL: requeue it ourselves (`scontrol requeue`) after the
  save, then exit; sacct shows REQUEUED. PreemptMode=REQUEUE on a requeueable
  job: SLURM requeues it, so we must not; but (measured on SLURM 22.05) SLURM
  requeues only a job it kills at the end of the grace period: a job that
  exits by itself during the grace ends FAILED or COMPLETED by its exit code
  and is NOT requeued. So the job waits, idle, for that kill; sacct then
  shows PREEMPTED. Either way: exactly one requeue per preemption.
- timeout: the time-limit warning (the timeout signal, or the time limit,
  StartTime + TimeLimit, is near). SLURM never requeues a timed-out job:
  requeue it ourselves. (Not EndTime: scancel moves EndTime to "now".)
- cancelled: any other SIGTERM (scancel; measured: the job shows COMPLETING,
  PreemptTime=None): do not requeue.
- a node failure: SLURM cancels the job's steps (SIGTERM to the tasks on the
  nodes still up) and requeues a requeueable job itself. Measured (SLURM 22.05,
  a node set DOWN under a 2-node job): at the SIGTERM the job shows
  COMPLETING, PreemptTime=None and Restarts already one more than when this
  start began. That rise is the sign (`requeued_by_slurm`): the job runs
  again whatever we do. sacct then records this run as NODE_FAIL: the stop
  is the failure class node_fail. A requeue on request (`scontrol requeue`)
  looks the same in scontrol but is recorded REQUEUED: a preemption.

Each requeue kind has a budget; a stop beyond it fails the run.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from ..config import RequeueBudget

# A SIGTERM this close to the end time is SLURM's time-limit kill, not a user's scancel.
TIME_LIMIT_SLACK_S = 90.0


class StopKind(str, enum.Enum):
    PREEMPTED = "preempted"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class Requeuer(str, enum.Enum):
    SELF = "self"  # scontrol requeue, after the save
    SLURM = "slurm"  # PreemptMode=REQUEUE: wait for the grace-end kill, SLURM requeues
    DONE = "done"  # SLURM has requeued the job already (a node of it failed): exit
    NONE = "none"


def budget_exhausted(budget: RequeueBudget, preemptions: int, timeouts: int) -> str | None:
    """Why the requeue budget is spent after this many stops, or None."""
    if preemptions > budget.max_preemptions:
        return f"preemption budget exhausted: preempted {preemptions} times, max_preemptions={budget.max_preemptions}"
    if timeouts > budget.max_timeouts:
        return (
            f"time-limit budget exhausted: reached the time limit {timeouts} times, max_timeouts={budget.max_timeouts}"
        )
    return None


@dataclass(frozen=True)
class Decision:
    kind: StopKind
    requeue_by: Requeuer
    fail_reason: str | None = None


def classify_stop(
    signal: str | None,
    job_state: str,
    preempt_time: dt.datetime | None,
    limit_end: dt.datetime | None,
    now: dt.datetime,
    timeout_signal: str = "SIGUSR2",
    preempt_signal: str = "SIGTERM",
) -> StopKind:
    if job_state.startswith("CANCELLED"):
        return StopKind.CANCELLED
    if preempt_time is not None:
        return StopKind.PREEMPTED
    near_limit = limit_end is not None and (limit_end - now).total_seconds() <= TIME_LIMIT_SLACK_S
    if signal == timeout_signal or near_limit:
        return StopKind.TIMEOUT
    if signal == "SIGTERM" or signal == "SIGINT":
        return StopKind.CANCELLED
    if signal == preempt_signal:  # a configured preemption signal without PreemptTime: sent on purpose
        return StopKind.PREEMPTED
    return StopKind.CANCELLED


def requeued_by_slurm(restarts_at_start: int, restarts_now: int, preempt_time: dt.datetime | None) -> bool:
    """SLURM requeued the job while it ran, not for a preemption: a node of it failed (or an administrator
    ran `scontrol requeue`). Our own requeues come after this classification, so never count here."""
    return preempt_time is None and restarts_now > restarts_at_start


def decide(kind: StopKind, timeouts: int, budget: RequeueBudget, slurm_requeues_preempted: bool) -> Decision:
    """`timeouts` counts this stop too.

    A spent time-limit budget fails the job now: it exits before the limit,
    so SLURM records FAILED. A spent preemption budget is enforced when the
    run starts again (`RequeueBudget.exhausted` on the run log), so that the
    job ends FAILED, not PREEMPTED, whatever the cluster's PreemptMode.
    """
    if kind is StopKind.CANCELLED:
        return Decision(kind, Requeuer.NONE)
    if kind is StopKind.TIMEOUT:
        reason = budget_exhausted(budget, 0, timeouts)
        return Decision(kind, Requeuer.NONE, reason) if reason else Decision(kind, Requeuer.SELF)
    return Decision(kind, Requeuer.SLURM if slurm_requeues_preempted else Requeuer.SELF)


def slurm_requeues_preempted(preempt_mode: str, job_requeueable: bool) -> bool:
    """True if SLURM requeues a preempted job that it kills (PreemptMode=REQUEUE, --requeue)."""
    return "REQUEUE" in preempt_mode.upper().split(",") and job_requeueable
