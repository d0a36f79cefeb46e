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
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import submitit
from submitit.core.utils import DelayedSubmission, temporary_save_path

from .config import SessionConfig
from .distributed import init_from_job
from .errors import HydraPreemptError
from .outcome import ExitCode, Status
from .preemption import SUBMITIT_LOCAL_REQUEUE_CODE, conclude
from .requeue import RequeueBudget
from .session import Session, run
from .slurm import check_submission

log = logging.getLogger("hydra_preempt")


class RunFailed(HydraPreemptError):
    """The run ended failed, diverged, or with a requeue budget spent: the job must end FAILED."""


class PreemptibleTask(submitit.helpers.Checkpointable):
    """Runs `train_fn(session)` so that preemption, time limits and requeues lose nothing.

    Works with submitit's AutoExecutor/SlurmExecutor used directly, or with
    `preemptible_executor`. Calling it returns the training function's result
    when training finished; on a stop it exits the process with the exit code
    of `hydra_preempt.ExitCode` (75: requeued, 130: cancelled) and raises
    RunFailed when the job must end FAILED. `max_preemptions`/`max_timeouts`,
    when given, replace the config's `requeue` section.

    A job of several tasks (`tasks_per_node` > 1 or several nodes) gets a
    torch.distributed process group (`distributed_backend`: "auto" picks
    nccl with CUDA, else gloo; None leaves it to the training function).
    """

    def __init__(
        self,
        train_fn: Callable[[Session], Any],
        run_dir: str | Path,
        config: SessionConfig | Mapping[str, Any] | None = None,
        max_preemptions: int | None = None,
        max_timeouts: int | None = None,
        distributed_backend: str | None = "auto",
    ) -> None:
        self.train_fn = train_fn
        self.run_dir = str(run_dir)
        config = config if isinstance(config, SessionConfig) else SessionConfig.from_mapping(config)
        budget = RequeueBudget(
            config.requeue.max_preemptions if max_preemptions is None else max_preemptions,
            config.requeue.max_timeouts if max_timeouts is None else max_timeouts,
        )
        self.config = dataclasses.replace(config, requeue=budget)
        self.distributed_backend = distributed_backend

    def __call__(self) -> Any:
        init_from_job(self.distributed_backend)
        outcome = run(self.train_fn, Path(self.run_dir), self.config)
        if outcome.status is Status.FINISHED:
            return outcome.result
        code = conclude(outcome, before_requeue=self._resubmit_pickle)
        if code in (ExitCode.REQUEUE, ExitCode.CANCELLED, SUBMITIT_LOCAL_REQUEUE_CODE):
            sys.exit(code)  # SystemExit: submitit writes no result, the job is not "done"
        raise RunFailed(f"run {self.run_dir} {outcome.status.value} at step {outcome.step}: {outcome.message}")

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """The requeue request: run this same task again.

        The state itself is already on disk: the session saved it at the step
        boundary where it stopped (signals only set flags, so no save ever
        starts inside a signal handler), and a new start resumes from it.
        """
        return DelayedSubmission(self, *args, **kwargs)

    def _resubmit_pickle(self) -> None:
        """Keep submitit's protocol: the requeued job runs what checkpoint() returned."""
        if not os.environ.get("SUBMITIT_FOLDER"):
            return
        paths = submitit.JobEnvironment().paths
        original = DelayedSubmission.load(paths.submitted_pickle)
        request = self.checkpoint()
        request.set_timeout(original._timeout_min, original._timeout_countdown)
        with temporary_save_path(paths.submitted_pickle) as tmp:
            request.dump(tmp)


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
