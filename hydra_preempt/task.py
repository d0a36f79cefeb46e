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
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import submitit
from submitit.core.utils import DelayedSubmission, temporary_save_path

from .config import SessionConfig
from .distributed import init_from_job
from .errors import ConfigError, HydraPreemptError
from .outcome import Status
from .preemption import RESUME_EXIT_CODES, conclude
from .requeue import RequeueBudget
from .session import Session, run
from .signals import parse_signal
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
        if code in RESUME_EXIT_CODES:
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
    signal: str = "USR2",
    signal_lead_s: int = 120,
    array_parallelism: int | None = None,
    name: str | None = None,
    setup: list[str] | None = None,
    sbatch_args: Mapping[str, Any] | None = None,
    srun_args: list[str] | None = None,
    cluster: str | None = None,
    check: bool = True,
) -> submitit.AutoExecutor:
    """A submitit executor set up for a preemptible QoS.

    On SLURM: --qos/--account/--partition, --requeue, --open-mode=append, the
    time-limit signal (`signal`, USR2 by default) `signal_lead_s` before the
    limit, and the task launched with srun as a job step so that it receives
    the grace SIGTERM. Values are checked first (ConfigError names the key);
    with `check`, the scheduler validates qos/account/partition
    (`sbatch --test-only`) and its refusal is raised as SlurmError.
    `cluster="local"` runs the same protocol on this machine.
    """
    signal_name = check_executor_settings(
        qos=qos, account=account, partition=partition, timeout_min=timeout_min, nodes=nodes, tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task, gpus_per_node=gpus_per_node, mem_gb=mem_gb, signal=signal, signal_lead_s=signal_lead_s,
        array_parallelism=array_parallelism, setup=setup, sbatch_args=sbatch_args, srun_args=srun_args, cluster=cluster,
    )
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {
        "timeout_min": timeout_min,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": cpus_per_task,
        "gpus_per_node": gpus_per_node,
        "mem_gb": mem_gb,
        "name": name,
    }
    if executor.cluster == "slurm":
        if check:
            check_submission(qos, account, partition)
        params.update(
            slurm_qos=qos,
            slurm_account=account,
            slurm_partition=partition,
            slurm_signal_delay_s=signal_lead_s,
            slurm_array_parallelism=array_parallelism,
            # "signal" replaces submitit's own --signal=USR2@lead line
            slurm_additional_parameters={"requeue": True, "signal": f"{signal_name}@{signal_lead_s}", **(sbatch_args or {})},
            slurm_setup=list(setup or []),
            slurm_srun_args=list(srun_args or []),
        )
    else:
        params.update(local_setup=list(setup or []))
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")


def check_executor_settings(
    *, qos: str | None, account: str | None, partition: str | None, timeout_min: int, nodes: int, tasks_per_node: int,
    cpus_per_task: int | None, gpus_per_node: int | None, mem_gb: float | None, signal: str, signal_lead_s: int,
    array_parallelism: int | None, setup: list[str] | None, sbatch_args: Mapping[str, Any] | None, srun_args: list[str] | None,
    cluster: str | None,
) -> str:
    """Raise ConfigError naming the first bad value; return the time-limit signal's name (e.g. 'USR2').

    Every value ends up in an #SBATCH line or an srun argument: names are kept
    to SLURM's character set and no value may carry a line break, so nothing
    can add lines to the job script.
    """
    if cluster not in (None, "slurm", "local", "debug"):
        raise ConfigError(f"cluster must be 'slurm' or 'local', got {cluster!r}")
    for key, value in (("qos", qos), ("account", account), ("partition", partition)):
        if value is not None and not (isinstance(value, str) and _SLURM_NAME.match(value)):
            raise ConfigError(f"{key} must be a SLURM name (letters, digits, _ . + -), got {value!r}")
    for key, value, least in (("timeout_min", timeout_min, 1), ("nodes", nodes, 1), ("tasks_per_node", tasks_per_node, 1),
                              ("cpus_per_task", cpus_per_task, 1), ("gpus_per_node", gpus_per_node, 0),
                              ("array_parallelism", array_parallelism, 1), ("signal_lead_s", signal_lead_s, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{key} must be an integer >= {least}, got {value!r}")
    if mem_gb is not None and (isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float)) or mem_gb <= 0):
        raise ConfigError(f"mem_gb must be a number > 0, got {mem_gb!r}")
    if signal_lead_s >= timeout_min * 60:
        raise ConfigError(f"signal_lead_s ({signal_lead_s}) must be shorter than the time limit ({timeout_min} min)")
    name = parse_signal(signal, "signal").name.removeprefix("SIG")
    for key, value in (sbatch_args or {}).items():
        if not (isinstance(key, str) and _SBATCH_KEY.match(key)):
            raise ConfigError(f"sbatch_args: {key!r} is not an sbatch option name (like 'constraint' or 'gres')")
        if "\n" in str(value) or "\r" in str(value):
            raise ConfigError(f"sbatch_args.{key} must not contain a line break")
    for key, values in (("srun_args", srun_args), ("setup", setup)):
        if values is not None and (not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values)):
            raise ConfigError(f"{key} must be a list of strings, got {values!r}")
    if any("\n" in a or "\r" in a for a in srun_args or []):
        raise ConfigError("srun_args must not contain line breaks")
    return name
