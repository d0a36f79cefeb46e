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
import functools
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import cloudpickle
import submitit
import torch
import torch.distributed as dist
from submitit.core.utils import DelayedSubmission, temporary_save_path

from ..config import SessionConfig
from ..errors import HydraPreemptError
from ..outcome import Status
from ..session.api import Session
from ..session.runner import JobContext, run
from ..slurm.commands import check_submission
from ..slurm.policy import RESUME_EXIT_CODES, conclude
from .settings import ExecutorSettings

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
        self.config = config if isinstance(config, SessionConfig) else SessionConfig.from_mapping(config)
        self.budget = dataclasses.replace(
            self.config.requeue,
            **{
                k: v for k, v in (("max_preemptions", max_preemptions), ("max_timeouts", max_timeouts)) if v is not None
            },
        )
        self.distributed_backend = distributed_backend

    def __call__(self) -> Any:
        created_group = init_from_job(self.distributed_backend)
        job = JobContext(budget=self.budget, ends_process=job_ends_process())
        try:
            outcome = run(self.train_fn, Path(self.run_dir), self.config, job)
        finally:
            # its threads must end before the process does (an abort at exit otherwise); the training
            # function may have destroyed it already, as a DDP script's last line does
            if created_group and dist.is_initialized():
                dist.destroy_process_group()
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

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "train_fn": PortableCallable(self.train_fn)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, train_fn=state["train_fn"].fn)

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


class PortableCallable:
    """A callable that travels to a job with the folder its code was imported from.

    A job's python starts with only its working directory and PYTHONPATH on sys.path, so a function from
    a module found beside the submitting script (`python scripts/launch.py` importing scripts/my_train.py:
    the script's folder is first on its sys.path, not on the job's) could not be unpickled there
    (ModuleNotFoundError). Pickled, this holds the function (cloudpickle) and that folder: its module's
    sys.path entry, or, for a function of the script itself (pickled by value, but importing modules
    beside it), the script's folder; never the interpreter's own directories (the standard library,
    site-packages), which the job has. Unpickled, it appends the folder after the job's own entries
    (never shadowing an installed module), then loads the function; if that fails, the error says in one
    line what failed, where the code came from, and what to do.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        root = import_root(self.fn)
        return {"roots": [root] if root else [], "fn": cloudpickle.dumps(self.fn)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for root in state["roots"]:
            if os.path.isdir(root) and root not in sys.path:
                sys.path.append(root)
        try:
            self.fn = pickle.loads(state["fn"])
        except Exception as e:  # a module gone, or changed since the submission (NameError, SyntaxError)
            raise HydraPreemptError(
                f"the training function cannot be loaded in the job: {type(e).__name__}: {e} (at submission its "
                f"code came from {', '.join(state['roots']) or 'modules the job has'}); install its module, or "
                "make that folder reachable from the nodes and put it on PYTHONPATH"
            ) from None


def import_root(fn: Callable[..., Any]) -> str | None:
    """The folder `fn`'s code was imported from: /x for a function of module a.b in /x/a/b.py, the
    script's folder for one of the running script (__main__); None for the interpreter's own
    directories (the standard library, site-packages) and for code without a file."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__module__", None) or type(fn).__module__
    file = getattr(sys.modules.get(name), "__file__", None)
    if not file:
        return None
    path = Path(os.path.abspath(file))
    depth = 0 if name == "__main__" else name.count(".") + (1 if path.stem == "__init__" else 0)
    root = str(path.parents[depth])
    interpreter = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    if any(root == p or root.startswith(p + os.sep) for p in interpreter) or Path(root).name in (
        "site-packages",
        "dist-packages",
    ):
        return None
    return root


def preemptible_executor(folder: str | Path, **settings: Any) -> submitit.AutoExecutor:
    """A submitit executor set up for a preemptible QoS; `settings` are the keys of ExecutorSettings.

    On SLURM: --qos/--account/--partition, --requeue, --open-mode=append, the
    time-limit signal (`signal`, USR2 by default) `signal_lead_s` before the
    limit, and the task launched with srun as a job step so that it receives
    the grace SIGTERM. Values are checked first (ConfigError names the key);
    with `check`, the scheduler validates qos/account/partition
    (`sbatch --test-only`) and its refusal is raised as SlurmError.
    `cluster="local"` runs the same protocol on this machine.
    """
    return executor_for(folder, ExecutorSettings.from_mapping(settings))


def executor_for(folder: str | Path, s: ExecutorSettings) -> submitit.AutoExecutor:
    """The executor of `preemptible_executor`, from settings already built."""
    signal_name = s.validate()
    executor = submitit.AutoExecutor(folder=folder, cluster=s.cluster)
    params: dict[str, Any] = {
        "timeout_min": s.timeout_min,
        "nodes": s.nodes,
        "tasks_per_node": s.tasks_per_node,
        "cpus_per_task": s.cpus_per_task,
        "gpus_per_node": s.gpus_per_node,
        "mem_gb": s.mem_gb,
        "name": s.name,
    }
    if executor.cluster == "slurm":
        if s.check:
            check_submission(s.qos, s.account, s.partition)
        params.update(
            slurm_qos=s.qos,
            slurm_account=s.account,
            slurm_partition=s.partition,
            slurm_signal_delay_s=s.signal_lead_s,
            slurm_array_parallelism=s.array_parallelism,
            # "signal" replaces submitit's own --signal=USR2@lead line
            slurm_additional_parameters={
                **(s.sbatch_args or {}),  # never a protocol option (validate), and the protocol's come last
                "requeue": True,
                "signal": f"{signal_name}@{s.signal_lead_s}",
            },
            slurm_setup=list(s.setup or []),
            slurm_srun_args=list(s.srun_args or []),
        )
    else:
        params.update(local_setup=list(s.setup or []))
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def init_from_job(backend: str | None = "auto") -> bool:
    """A process group for a job of several tasks (SLURM or submitit local), from its environment;
    True if this created one (the caller destroys it).

    "auto" picks nccl with CUDA, else gloo; None leaves it to the training function.
    """
    if backend is None or dist.is_initialized():
        return False
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return False
    if env.num_tasks <= 1:
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group(backend)
    return True


def job_ends_process() -> bool:
    """True inside a job's own process (SLURM, submitit local), which exits after the task.

    False for submitit's debug executor and outside a job: the task runs inside the caller's
    program, which must get its signal handlers back (see JobContext.ends_process).
    """
    try:
        return submitit.JobEnvironment().cluster != "debug"
    except RuntimeError:  # not inside a submitit job
        return False
