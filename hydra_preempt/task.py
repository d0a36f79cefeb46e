"""The submitit front door: a checkpointable task that survives preemption, and an executor set up for it.

    executor = preemptible_executor("submitit-logs", qos="preemptible", account="research", timeout_min=60)
    job = executor.submit(PreemptibleTask(train, "runs/exp1", {"checkpoint": {"every_steps": 100}}))

On SLURM the task runs as a job step (submitit launches it with srun), so
it receives the grace-period SIGTERM. The session saves at the next step
boundary; the task then asks the scheduler what the stop was (preemption,
time limit, scancel), requeues when that is its job, and exits.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import submitit
import torch
import torch.distributed as dist
from submitit.core.utils import DelayedSubmission, temporary_save_path

from .config import SessionConfig
from .errors import HydraPreemptError
from .outcome import EXIT_CODES, ExitCode, Outcome, Status
from .requeue import Decision, Requeuer, RequeueBudget, StopKind, classify_stop, decide, slurm_requeues_preempted
from .runlog import append_event, read_events
from .session import Session, run
from .signals import parse_signal
from .slurm import ClusterFacts, SlurmError, SlurmTask, check_submission, cluster_facts, requeue_job, show_job

log = logging.getLogger("hydra_preempt")

# Beyond the grace end: SLURM's scheduling granularity (~20 s measured) and KillWait.
_KILL_MARGIN_S = 120.0

_STATUS_OF_KIND = {StopKind.PREEMPTED: Status.PREEMPTED, StopKind.TIMEOUT: Status.TIMEOUT, StopKind.CANCELLED: Status.CANCELLED}


class RunFailed(HydraPreemptError):
    """The run ended failed, diverged, or with a requeue budget spent: the job must end FAILED."""


def stop_counts(run_dir: Path) -> dict[str, int]:
    """How many earlier stops of each reason the run log holds."""
    counts: dict[str, int] = {}
    for event in read_events(run_dir):
        if event["event"] == "stop":
            counts[event["reason"]] = counts.get(event["reason"], 0) + 1
    return counts


class PreemptibleTask(submitit.helpers.Checkpointable):
    """Runs `train_fn(session)` so that preemption, time limits and requeues lose nothing.

    Works with submitit's AutoExecutor/SlurmExecutor used directly, or with
    `preemptible_executor`. Calling it returns the training function's result
    when training finished; on a stop it exits the process with the exit code
    of `hydra_preempt.ExitCode` (75: requeued, 130: cancelled) and raises
    RunFailed when the job must end FAILED.

    A job of several tasks (`tasks_per_node` > 1 or several nodes) gets a
    torch.distributed process group (`distributed_backend`: "auto" picks
    nccl with CUDA, else gloo; None leaves it to the training function).
    """

    def __init__(
        self,
        train_fn: Callable[[Session], Any],
        run_dir: str | Path,
        config: SessionConfig | Mapping[str, Any] | None = None,
        max_preemptions: int = RequeueBudget.max_preemptions,
        max_timeouts: int = RequeueBudget.max_timeouts,
        distributed_backend: str | None = "auto",
    ) -> None:
        self.train_fn = train_fn
        self.run_dir = str(run_dir)
        self.config = config if isinstance(config, SessionConfig) else SessionConfig.from_mapping(config)
        self.budget = RequeueBudget(max_preemptions, max_timeouts)
        self.distributed_backend = distributed_backend
        self._decision: Decision | None = None

    def __call__(self) -> Any:
        run_dir = Path(self.run_dir)
        task = SlurmTask.from_env()
        counts = stop_counts(run_dir)
        spent = self.budget.exhausted(counts.get("preempted", 0), counts.get("timeout", 0))
        if spent:
            if task is None or task.rank == 0:
                append_event(run_dir, "start")
                append_event(run_dir, "stop", reason=Status.FAILED.value, exit_code=int(ExitCode.FAILED), message=spent)
            raise RunFailed(spent)
        if task is not None and task.ntasks > 1 and self.distributed_backend and not dist.is_initialized():
            backend = self.distributed_backend
            if backend == "auto":
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            dist.init_process_group(backend)
        self._decision = None
        if task is None:
            return self._finish(run(self.train_fn, run_dir, self.config), None)
        facts = _read_cluster_facts(task)  # now, not on the clock of a grace period
        outcome = run(
            self.train_fn,
            run_dir,
            self.config,
            seconds_left=lambda: self._seconds_left(task, facts),
            on_stop=lambda o: self._classify(o, task, facts, counts),
        )
        return self._finish(outcome, task, facts)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """The requeue request: run this same task again.

        The state itself is already on disk: the session saved it at the step
        boundary where it stopped (signals only set flags, so no save ever
        starts inside a signal handler), and a new start resumes from it.
        """
        return DelayedSubmission(self, *args, **kwargs)

    # -- SLURM: what was the stop, and who requeues -----------------------------------
    def _seconds_left(self, task: SlurmTask, facts: ClusterFacts) -> float | None:
        """Seconds until SLURM's SIGKILL: KillWait after the grace end (preemption) or the end time
        (time limit, and scancel, which sets the end time to now)."""
        try:
            job = show_job(task.job_id)
        except SlurmError as e:
            log.warning("cannot read the job's deadline: %s", e)
            return None
        now = dt.datetime.now()
        if job.preempt_time is not None and not job.state.startswith("CANCELLED"):
            return (job.preempt_time - now).total_seconds() + facts.grace_s + facts.kill_wait_s
        return (job.end_time - now).total_seconds() + facts.kill_wait_s if job.end_time else None

    def _classify(self, outcome: Outcome, task: SlurmTask, facts: ClusterFacts, counts: dict[str, int]) -> Outcome:
        if outcome.status is not Status.PREEMPTED:
            return outcome
        try:
            job = show_job(task.job_id)  # PreemptTime is set before the grace SIGTERM is sent
        except SlurmError as e:
            log.error("cannot ask SLURM what stopped the job (%s): treating it as a preemption", e)
            self._decision = Decision(StopKind.PREEMPTED, Requeuer.SELF)
            return outcome
        kind = classify_stop(
            outcome.signal, job.state, job.preempt_time, job.limit_end, dt.datetime.now(),
            timeout_signal=parse_signal(self.config.signals.timeout, "signals.timeout").name,
            preempt_signal=parse_signal(self.config.signals.preempt).name,
        )
        timeouts = counts.get("timeout", 0) + (kind is StopKind.TIMEOUT)
        self._decision = decision = decide(kind, timeouts, self.budget, slurm_requeues_preempted(facts.preempt_mode, job.requeue))
        if decision.fail_reason:
            return dataclasses.replace(outcome, status=Status.FAILED, exit_code=ExitCode.FAILED, message=f"{decision.fail_reason}; {outcome.message}")
        status = _STATUS_OF_KIND[kind]
        note = {Requeuer.SELF: "requeueing", Requeuer.SLURM: "SLURM requeues it at the end of the grace period", Requeuer.NONE: "not requeued"}[decision.requeue_by]
        return dataclasses.replace(outcome, status=status, exit_code=EXIT_CODES[status], message=f"{kind.value}: {outcome.message}; {note}")

    def _finish(self, outcome: Outcome, task: SlurmTask | None, facts: ClusterFacts | None = None) -> Any:
        if outcome.status is Status.FINISHED:
            return outcome.result
        if outcome.status in (Status.PREEMPTED, Status.TIMEOUT):
            requeue_by = self._decision.requeue_by if task is not None and self._decision else Requeuer.NONE
            if requeue_by is Requeuer.SLURM:
                self._await_slurm_requeue(task, facts, outcome)  # type: ignore[arg-type]
            elif requeue_by is Requeuer.SELF:
                self._requeue(task, outcome)  # type: ignore[arg-type]
            sys.exit(int(ExitCode.REQUEUE))  # SystemExit: submitit writes no result, the job is not "done"
        if outcome.status is Status.CANCELLED:
            sys.exit(int(ExitCode.CANCELLED))
        raise RunFailed(f"run {self.run_dir} {outcome.status.value} at step {outcome.step}: {outcome.message}")

    def _await_slurm_requeue(self, task: SlurmTask, facts: ClusterFacts, outcome: Outcome) -> None:
        """PreemptMode=REQUEUE: stay alive, idle, until SLURM kills the job at the end of the grace period.

        SLURM requeues only a preempted job that it kills; one that exits first
        ends FAILED/COMPLETED and is lost. Should the kill not come in time,
        requeue ourselves rather than risk that.
        """
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # no second checkpoint path while waiting
        left = self._seconds_left(task, facts) or 0.0
        limit = time.monotonic() + max(left, 0.0) + _KILL_MARGIN_S
        log.info("state saved; waiting up to %.0f s for SLURM to end the grace period and requeue the job", limit - time.monotonic())
        append_event(Path(self.run_dir), "await_requeue", step=outcome.step, seconds_left=left)
        while time.monotonic() < limit:
            time.sleep(1.0)
        log.warning("SLURM did not end the job after the grace period: requeueing it ourselves")
        self._requeue(task, outcome)

    def _requeue(self, task: SlurmTask, outcome: Outcome) -> None:
        """Save first (done), then requeue, then exit: SLURM kills what remains after KillWait."""
        if task.rank != 0:
            return
        folder = os.environ.get("SUBMITIT_FOLDER")
        if folder:  # keep submitit's protocol: the requeued job runs what checkpoint() returned
            paths = submitit.JobEnvironment().paths
            original = DelayedSubmission.load(paths.submitted_pickle)
            request = self.checkpoint()
            request.set_timeout(original._timeout_min, original._timeout_countdown)
            with temporary_save_path(paths.submitted_pickle) as tmp:
                request.dump(tmp)
        requeue_job(task.job_id)
        since = time.time() - outcome.signal_time if outcome.signal_time else None
        append_event(Path(self.run_dir), "requeue", step=outcome.step, signal_to_requeue_s=since)
        log.info("requeued job %s at step %d", task.job_id, outcome.step)


def _read_cluster_facts(task: SlurmTask) -> ClusterFacts:
    try:
        return cluster_facts(show_job(task.job_id).qos)
    except SlurmError as e:
        log.warning("cannot read KillWait/GraceTime/PreemptMode (%s): assuming none", e)
        return ClusterFacts()


def preemptible_executor(
    folder: str | Path,
    *,
    qos: str | None = "preemptible",
    account: str | None = None,
    partition: str | None = None,
    timeout_min: int = 60,
    nodes: int = 1,
    tasks_per_node: int = 1,
    cpus_per_task: int | None = None,
    gpus_per_node: int | None = None,
    mem_gb: float | None = None,
    signal_lead_s: int = 120,
    setup: list[str] | None = None,
    sbatch_args: Mapping[str, Any] | None = None,
    srun_args: list[str] | None = None,
    cluster: str | None = None,
    check: bool = True,
) -> submitit.AutoExecutor:
    """A submitit executor set up for a preemptible QoS.

    On SLURM: --qos/--account/--partition, --requeue, --open-mode=append, the
    time-limit signal (USR2) `signal_lead_s` before the limit, and the task
    launched with srun as a job step so that it receives the grace SIGTERM.
    With `check`, the scheduler validates qos/account/partition first
    (`sbatch --test-only`) and its refusal is raised as SlurmError.
    `cluster="local"` runs the same protocol on this machine.
    """
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {
        "timeout_min": timeout_min,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": cpus_per_task,
        "gpus_per_node": gpus_per_node,
        "mem_gb": mem_gb,
    }
    if executor.cluster == "slurm":
        if check:
            check_submission(qos, account, partition)
        params.update(
            slurm_qos=qos,
            slurm_account=account,
            slurm_partition=partition,
            slurm_signal_delay_s=signal_lead_s,
            slurm_additional_parameters={"requeue": True, **(sbatch_args or {})},
            slurm_setup=list(setup or []),
            slurm_srun_args=list(srun_args or []),
        )
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor
