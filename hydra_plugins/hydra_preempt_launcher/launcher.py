"""hydra/launcher=preempt_slurm (and preempt_local): one preemptible job per point of a sweep.

Each job runs the app's task function under hydra_preempt's stop protocol:
inside the job, `hydra_preempt.run()` saves and classifies the stop, and this
launcher's job callable concludes it (requeue, wait for SLURM, or exit 144
for submitit's local executor). A requeued job loads the same pickled
config and writes to the same, pinned, output directory.

Before anything is submitted the launcher checks its settings, refuses a
sweep directory that holds another sweep, skips jobs whose run finished and
jobs the scheduler still holds, and records every job in the manifest.
Heavy imports happen in the methods: Hydra imports this module for every
app start, to discover plugins.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .config import PreemptLauncherConf

log = logging.getLogger(__name__)

# Keys of PreemptLauncherConf that are the launcher's own, not the executor's.
_LAUNCHER_KEYS = ("submitit_folder", "wait", "max_preemptions", "max_timeouts")
_POLL_S = 5.0


class SweepJobError(RuntimeError):
    """A job of the sweep did not finish (failed, cancelled, diverged); its run directory keeps its state."""


class PreemptLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in params.items()}
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    # -- inside the job ------------------------------------------------------------
    def __call__(self, sweep_overrides: List[str], job_num: int, job_dir: str, singleton_state: Dict[type, Singleton]) -> JobReturn:
        import submitit

        from hydra_preempt import preemption
        from hydra_preempt.distributed import init_from_job
        from hydra_preempt.outcome import Outcome, Status
        from hydra_preempt.requeue import RequeueBudget
        from hydra_preempt.task import RunFailed

        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(sweep_overrides))
        with read_write(sweep_config.hydra), open_dict(sweep_config.hydra):
            sweep_config.hydra.job.id = submitit.JobEnvironment().job_id
            sweep_config.hydra.job.num = job_num
            # the directory the launcher chose: a requeue writes where the first start did
            sweep_config.hydra.sweep.dir = str(Path(job_dir).parent)
            sweep_config.hydra.sweep.subdir = Path(job_dir).name
        init_from_job("auto")
        preemption.latest_outcome = None
        budget = RequeueBudget(self.params["max_preemptions"], self.params["max_timeouts"])
        with preemption.requeue_budget(budget):
            ret = run_job(
                hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
            )
        value = ret.return_value  # a task that raised raises here: the job ends FAILED with its traceback
        outcome = value if isinstance(value, Outcome) else preemption.latest_outcome
        if outcome is None or outcome.status is Status.FINISHED:
            return ret
        code = preemption.conclude(outcome)
        if code in preemption.RESUME_EXIT_CODES:
            sys.exit(code)  # no result pickle: submitit and SLURM see a job that will run again (or was cancelled)
        raise RunFailed(f"job #{job_num} {outcome.status.value} at step {outcome.step}: {outcome.message}")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue request: the same job, which resumes from its run directory."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    # -- on the submitting side -------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_preempt.errors import HydraPreemptError
        from hydra_preempt.slurm import SlurmError

        try:
            return self._launch(job_overrides, initial_job_idx)
        except (HydraPreemptError, SlurmError) as e:
            # a user's mistake, caught before anything was submitted: its message, no traceback
            print(f"Error in hydra/launcher={self._config_name()}: {e}", file=sys.stderr)
            sys.exit(2)

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_preempt import sweep
        from hydra_preempt.errors import ConfigError
        from hydra_preempt.requeue import RequeueBudget
        from hydra_preempt.task import preemptible_executor

        assert self.config is not None and self.hydra_context is not None
        p = self.params
        unknown = sorted(set(p) - {f.name for f in dataclasses.fields(PreemptLauncherConf)})
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join('hydra.launcher.' + k for k in unknown)}")
        RequeueBudget(p["max_preemptions"], p["max_timeouts"])
        self._check_signal_matches_app()
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        planned = [
            sweep.SweepJob(initial_job_idx + i, list(o), self._job_dir(sweep_dir, list(o), initial_job_idx + i), p["cluster"])
            for i, o in enumerate(job_overrides)
        ]
        recorded = sweep.load_manifest(sweep_dir)
        sweep.check_same_sweep(sweep_dir, recorded, planned)
        finished, active, to_submit = self._triage(planned, recorded)
        log.info("preempt_%s sweep in %s: %d job(s) to submit, %d finished, %d still with the scheduler",
                 p["cluster"], sweep_dir, len(to_submit), len(finished), len(active))
        for job in planned:
            mark = "finished, skipped" if job in finished else f"still {active[job.num]}, not resubmitted" if job.num in active else "submitting"
            log.info("\t#%d : %s  (%s)", job.num, " ".join(filter_overrides(job.overrides)), mark)
        submitted = []
        if to_submit:
            executor_params = {k: v for k, v in p.items() if k not in _LAUNCHER_KEYS}
            executor = preemptible_executor(p["submitit_folder"], **executor_params)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            state = Singleton.get_state()
            args = [(job.overrides, job.num, job.dir, state) for job in to_submit]
            submitted = executor.map_array(self, *zip(*args))
            for job, handle in zip(to_submit, submitted):
                job.job_id = str(handle.job_id)
        manifest = sweep.save_manifest(sweep_dir, {**recorded, **{job.num: job for job in planned}})
        if not p["wait"]:
            log.info("submitted; manifest %s; follow with: hydra-preempt status %s", manifest, sweep_dir)
            # Hydra's sweeper asserts on UNKNOWN: the launch itself completed; the value says what was done
            return [self._job_return(job, JobStatus.COMPLETED, {"job_id": job.job_id, "dir": job.dir}) for job in planned]
        handles = {job.num: h for job, h in zip(to_submit, submitted)}
        return [self._wait_for(job, handles.get(job.num), job in finished) for job in planned]

    def _triage(self, planned: list, recorded: dict) -> tuple[list, dict[int, str], list]:
        """(finished, {num: scheduler state of jobs still held}, to submit) for a run of the same sweep."""
        from hydra_preempt import sweep

        finished, active, to_submit = [], {}, []
        for job in planned:
            old = recorded.get(job.num)
            if old is not None:
                job.job_id = old.job_id
            if sweep.run_standing(Path(job.dir)).finished:
                finished.append(job)
                continue
            if old is not None and old.cluster == job.cluster:
                state = sweep.scheduler_state(old)
                if sweep.is_active(state):
                    active[job.num] = state
                    continue
            to_submit.append(job)
        return finished, active, to_submit

    def _wait_for(self, job: Any, handle: Any, was_finished: bool) -> JobReturn:
        """The job's JobReturn once it is over: its own (submitted now), or one read from its run directory."""
        from hydra_preempt import sweep

        job_error = None
        if handle is not None:
            try:
                return handle.results()[0]
            except Exception as e:  # the job did not finish: Hydra reports it when the sweep collects the results
                job_error = e
        while not was_finished and handle is None and sweep.is_active(sweep.scheduler_state(job)):
            time.sleep(_POLL_S)
        standing = sweep.run_standing(Path(job.dir))
        if standing.finished:
            return self._job_return(job, JobStatus.COMPLETED, standing.result)
        detail = f"\n{job_error}" if job_error else ""
        error = SweepJobError(f"job #{job.num} ({job.job_id}) ended {standing.status}: {standing.message}; run directory {job.dir}{detail}")
        return self._job_return(job, JobStatus.FAILED, error)

    def _job_return(self, job: Any, status: JobStatus, value: Any = None) -> JobReturn:
        ret = JobReturn(overrides=job.overrides, working_dir=job.dir, task_name=str(self.config.hydra.job.name), status=status)
        ret._return_value = value
        return ret

    def _job_dir(self, sweep_dir: Path, overrides: list[str], num: int) -> str:
        """The job's output directory, resolved once here so that requeues reuse it."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.job.num = num
        return str(sweep_dir / str(OmegaConf.select(cfg, "hydra.sweep.subdir")))

    def _check_signal_matches_app(self) -> None:
        from hydra_preempt.errors import ConfigError
        from hydra_preempt.signals import parse_signal

        app_signal = OmegaConf.select(self.config, "signals.timeout", default=None)
        mine = parse_signal(self.params["signal"], "signal").name
        if app_signal is not None and parse_signal(str(app_signal), "signals.timeout").name != mine:
            raise ConfigError(f"signal={self.params['signal']} but the app's signals.timeout={app_signal}: the time-limit warning would not be caught")

    def _config_name(self) -> str:
        return "preempt_local" if self.params.get("cluster") == "local" else "preempt_slurm"
