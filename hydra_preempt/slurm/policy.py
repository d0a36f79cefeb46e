"""The stop policy around a run inside a SLURM job: what a stop was, and the requeue after the save.

`run()` applies `SlurmStopPolicy` whenever it runs inside a SLURM job,
whichever front door started it: a submitit task, a Hydra launcher job, or
`srun python train.py` under Snakemake. The policy tells preemption, time
limit and scancel apart while the run is stopping and writes the verdict
into the Outcome. `conclude(outcome)` then does the part that must follow
the save and the run log: requeue (or wait for SLURM to requeue), and
returns the exit code the process should end with.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ..outcome import EXIT_CODES, ExitCode, Outcome, Status
from ..rundir import JobIdentity, RunLog
from .commands import (
    ClusterFacts,
    JobInfo,
    SlurmError,
    cluster_facts,
    requeue_job,
    sacct_states,
    show_job,
    stop_signals_held,
)
from .env import SlurmTask, under_submitit_local
from .failures import RestartDecision
from .stop import (
    Decision,
    RequeueBudget,
    Requeuer,
    StopKind,
    classify_stop,
    decide,
    requeued_by_slurm,
    slurm_requeues_preempted,
)

log = logging.getLogger("hydra_preempt")

# How long a stop waits for the accounting to record why SLURM requeued the job (measured: ~0.2 s).
RECORD_WAIT_S = 3.0
# Beyond the grace end: SLURM's scheduling granularity (~20 s measured) and KillWait.
KILL_MARGIN_S = 120.0
# submitit's local executor runs a task again when it exits with this code.
SUBMITIT_LOCAL_REQUEUE_CODE = 144

# Exit codes of a job that will run again (requeued) or must not (cancelled): not a failure.
RESUME_EXIT_CODES = (int(ExitCode.REQUEUE), int(ExitCode.CANCELLED), SUBMITIT_LOCAL_REQUEUE_CODE)

_STATUS_OF_KIND = {
    StopKind.PREEMPTED: Status.PREEMPTED,
    StopKind.TIMEOUT: Status.TIMEOUT,
    StopKind.CANCELLED: Status.CANCELLED,
}


class SlurmStopPolicy:
    """Classifies a stop of a run inside a SLURM job and decides who requeues it.

    `stops` counts the run's earlier stops by reason (from the run log);
    signal names are canonical ('SIGUSR2').
    """

    def __init__(
        self,
        task: SlurmTask,
        facts: ClusterFacts,
        restarts: int,
        stops: dict[str, int],
        budget: RequeueBudget,
        preempt_signal: str,
        timeout_signal: str,
        restart_decision: Callable[[str], RestartDecision] | None = None,
        restarts_known: bool = True,
    ) -> None:
        self.task = task
        # `restarts` read from the scheduler at the start (not SLURM_RESTART_COUNT, which a job step may
        # lack): only then does a higher count at a stop say that SLURM requeued the job under us
        self.restarts_known = restarts_known
        self.restart_decision = restart_decision
        self.facts = facts
        self.identity = JobIdentity(task.job_id, restarts)
        self.stops = stops
        self.budget = budget
        self.preempt_signal = preempt_signal
        self.timeout_signal = timeout_signal

    @classmethod
    def start(
        cls,
        task: SlurmTask,
        stops: dict[str, int],
        budget: RequeueBudget,
        preempt_signal: str,
        timeout_signal: str,
        restart_decision: Callable[[str], RestartDecision] | None = None,
    ) -> SlurmStopPolicy:
        """Read the job's static facts now, not on the clock of a grace period. `restart_decision(name)`:
        the restart policy's decision for one more failure of class `name` (node_fail)."""
        restarts, known = task.restart_count, False
        try:
            job = show_job(task.job_id)
            # SLURM_RESTART_COUNT does not reach every job step (Snakemake's job step drops it)
            restarts, known = job.restarts, True
            facts = cluster_facts(job.qos)
        except SlurmError as e:
            log.warning("cannot read KillWait/GraceTime/PreemptMode (%s): assuming none", e)
            facts = ClusterFacts(grace_s=None)  # a preemption's kill is then unknown, not due at the signal
        if task.in_batch_step and facts.grace_s:
            log.warning(
                "this process was started outside a job step of job %s (by the batch script, or in salloc's "
                "shell), not by srun: SLURM sends the preemption signal to job steps only, so it reaches this "
                "process at the final kill, with no time to save; start it as `srun python ...`",
                task.job_id,
            )
        return cls(task, facts, restarts, stops, budget, preempt_signal, timeout_signal, restart_decision, known)

    def seconds_left(self) -> float | None:
        """Seconds until SLURM's SIGKILL: KillWait after the grace end (preemption) or the end time
        (time limit, and scancel, which sets the end time to now)."""
        try:
            job = show_job(self.task.job_id)
        except SlurmError as e:
            log.warning("cannot read the job's deadline: %s", e)
            return None
        now = dt.datetime.now()
        if job.preempt_time is not None and not job.state.startswith("CANCELLED"):
            if self.facts.grace_s is None:  # the QoS's GraceTime is unknown: so is the kill
                return None
            return (job.preempt_time - now).total_seconds() + self.facts.grace_s + self.facts.kill_wait_s
        return (job.end_time - now).total_seconds() + self.facts.kill_wait_s if job.end_time else None

    def classify(self, outcome: Outcome) -> Outcome:
        """A signal stop (status PREEMPTED from the session) -> preempted / timeout / cancelled, with who requeues."""
        if outcome.status is not Status.PREEMPTED:
            return outcome
        try:
            job = show_job(self.task.job_id)  # PreemptTime is set before the grace SIGTERM is sent
        except SlurmError as e:
            log.error("cannot ask SLURM what stopped the job (%s): treating it as a preemption", e)
            return dataclasses.replace(outcome, requeue_by=Requeuer.SELF.value)
        if self.restarts_known and requeued_by_slurm(self.identity.restart_count, job.restarts, job.preempt_time):
            return self._requeued_by_slurm(outcome, job)
        kind = classify_stop(
            outcome.signal,
            job.state,
            job.preempt_time,
            job.limit_end,
            dt.datetime.now(),
            timeout_signal=self.timeout_signal,
            preempt_signal=self.preempt_signal,
        )
        timeouts = self.stops.get("timeout", 0) + (kind is StopKind.TIMEOUT)
        decision = decide(kind, timeouts, self.budget, slurm_requeues_preempted(self.facts.preempt_mode, job.requeue))
        return _apply(outcome, decision, self.seconds_left())

    def _requeued_by_slurm(self, outcome: Outcome, job: JobInfo) -> Outcome:
        """SLURM requeued the job under us: the state is saved, the job runs again whatever we do. Why, the
        accounting's record of this run tells (measured, within ~0.2 s of the SIGTERM): NODE_FAIL, a node
        failure; REQUEUED, a requeue on request (`scontrol requeue`, an administrator or a tool), taken as a
        preemption: no failure, counted against max_preemptions. No record in time: a node failure (the
        budgeted reading)."""
        seen = f"scontrol: Restarts {self.identity.restart_count} -> {job.restarts} and no PreemptTime at the {outcome.signal or 'stop'}"
        recorded = self._recorded_end(self.identity.restart_count)
        if recorded == "REQUEUED":
            return dataclasses.replace(
                outcome,
                exit_code=ExitCode.REQUEUE,
                message=f"preempted: {outcome.message}; SLURM requeued the job on request (sacct: REQUEUED, no node failed)",
                requeue_by=Requeuer.DONE.value,
            )
        why = f"sacct: {recorded}" if recorded else "a node of it failed"
        return self._node_failure(outcome, f"{seen}: SLURM requeued the job ({why})")

    def _recorded_end(self, run: int) -> str | None:
        """The accounting's state of the job's run number `run` (0 the first) once it has ended, waiting
        up to RECORD_WAIT_S for it; None if it cannot be read by then."""
        deadline = time.monotonic() + RECORD_WAIT_S
        while True:
            try:
                runs = sacct_states(self.task.job_id)
                state = runs[run][0].split()[0] if len(runs) > run else ""
            except SlurmError as e:
                log.warning("cannot read why SLURM requeued the job (%s)", e)
                return None
            if state and state not in ("RUNNING", "COMPLETING", "PENDING", "REQUEUE_HOLD"):
                return state
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)

    def _node_failure(self, outcome: Outcome, evidence: str) -> Outcome:
        """A node failed: within the node_fail budget that is a restart (exit 75); beyond it the run fails,
        and the start SLURM makes anyway ends at once (runner: a start after a refused restart of the
        same job)."""
        decision = self.restart_decision("node_fail") if self.restart_decision else None
        restart = decision.restart if decision else True
        reason = decision.reason if decision else "node_fail: restart"
        return dataclasses.replace(
            outcome,
            status=Status.FAILED,
            exit_code=ExitCode.REQUEUE if restart else ExitCode.FAILED,
            message=f"node_fail: {outcome.message}; SLURM requeued the job; {reason}",
            requeue_by=Requeuer.DONE.value,
            failure="node_fail",
            evidence=evidence,
            restart_reason=reason,
        )


def _apply(outcome: Outcome, decision: Decision, seconds_left: float | None) -> Outcome:
    if decision.fail_reason:
        return dataclasses.replace(
            outcome,
            status=Status.FAILED,
            exit_code=ExitCode.FAILED,
            message=f"{decision.fail_reason}; {outcome.message}",
        )
    status = _STATUS_OF_KIND[decision.kind]
    note = {
        Requeuer.SELF: "requeueing",
        Requeuer.SLURM: "SLURM requeues it at the end of the grace period",
        Requeuer.NONE: "not requeued",
    }[decision.requeue_by]
    kill_deadline = time.time() + seconds_left if seconds_left is not None else None
    return dataclasses.replace(
        outcome,
        status=status,
        exit_code=EXIT_CODES[status],
        message=f"{decision.kind.value}: {outcome.message}; {note}",
        requeue_by=decision.requeue_by.value,
        kill_deadline=kill_deadline,
    )


def conclude(outcome: Outcome, before_requeue: Callable[[], None] | None = None) -> int:
    """After the run: requeue when the policy said so, and return the exit code for the process.

    Under PreemptMode=REQUEUE this waits, idle, for SLURM's kill at the grace
    end (measured on SLURM 22.05: SLURM requeues only a preempted job it kills;
    one that exits by itself during the grace is lost). `before_requeue` runs
    just before `scontrol requeue` (submitit rewrites its job pickle there).
    Under submitit's local executor a stop to resume exits 144, its requeue code.
    """
    # exit 75: saved and to run again (a preemption, a time limit, a failure the restart policy restarts)
    if outcome.exit_code == ExitCode.REQUEUE:
        task = SlurmTask.from_env()
        if task is not None and outcome.requeue_by == Requeuer.SLURM.value:
            _await_slurm_requeue(task, outcome, before_requeue)
        elif task is not None and outcome.requeue_by == Requeuer.SELF.value:
            _requeue(task, outcome, before_requeue)
        elif task is None and under_submitit_local():
            return SUBMITIT_LOCAL_REQUEUE_CODE
    return int(outcome.exit_code)


def exit_with(outcome: Outcome) -> None:
    """`sys.exit(conclude(outcome))` for a script's main (train.py under srun, Snakemake)."""
    sys.exit(conclude(outcome))


def _await_slurm_requeue(task: SlurmTask, outcome: Outcome, before_requeue: Callable[[], None] | None) -> None:
    """Stay alive until SLURM kills the job at the end of the grace period; requeue ourselves if it does not."""
    if threading.current_thread() is threading.main_thread():  # else the watchdog's: no handler acts now
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # no second checkpoint path while waiting
    left = outcome.kill_deadline - time.time() if outcome.kill_deadline else 0.0
    limit = time.monotonic() + max(left, 0.0) + KILL_MARGIN_S
    log.info(
        "state saved; waiting up to %.0f s for SLURM to end the grace period and requeue the job",
        limit - time.monotonic(),
    )
    if task.rank == 0 and outcome.run_dir:
        _run_log(task, outcome).append("await_requeue", step=outcome.step, seconds_left=left)
    while time.monotonic() < limit:
        time.sleep(1.0)
    log.warning("SLURM did not end the job after the grace period: requeueing it ourselves")
    _requeue(task, outcome, before_requeue)


def _requeue(task: SlurmTask, outcome: Outcome, before_requeue: Callable[[], None] | None) -> None:
    """Save first (done), then requeue, then exit: SLURM kills what remains after KillWait."""
    if task.rank != 0:
        return
    if before_requeue is not None:
        before_requeue()
    since = time.time() - outcome.signal_time if outcome.signal_time else None
    run_log = _run_log(task, outcome) if outcome.run_dir else None
    try:
        requeue_recorded(task.job_id, run_log, step=outcome.step, signal_to_requeue_s=since)
    except SlurmError as e:
        log.error("requeueing job %s failed: %s (the state is saved: resubmit to continue)", task.job_id, e)
        return
    log.info("requeued job %s at step %d", task.job_id, outcome.step)


def requeue_recorded(job_id: str, run_log: RunLog | None, **fields: object) -> None:
    """`scontrol requeue` of this job, with a `requeue` event in the run log written first: the requeue
    ends this process (SIGTERM, then SIGKILL, at once when srun forces the step's end), so an event
    written after the command returns can be lost. A refusal adds a `requeue_failed` event and raises
    SlurmError."""
    with stop_signals_held():  # the requeue's own SIGTERM waits until the refusal, if any, is recorded
        if run_log is not None:
            run_log.append("requeue", **fields)
        try:
            requeue_job(job_id)
        except SlurmError as e:
            if run_log is not None:
                run_log.append("requeue_failed", error=str(e), **fields)
            raise


def _run_log(task: SlurmTask, outcome: Outcome) -> RunLog:
    assert outcome.run_dir is not None
    return RunLog(Path(outcome.run_dir), outcome.job or JobIdentity(task.job_id, task.restart_count))
