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
import os
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

_POLL_S = 5.0


class SweepJobError(RuntimeError):
    """A job of the sweep did not finish (failed, cancelled, diverged); its run directory keeps its state."""


class PreemptLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.params: Dict[str, Any] = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in params.items()
        }
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def __getstate__(self) -> Dict[str, Any]:
        """The app's task function travels with the folders its code came from (PortableCallable): the
        modules an app imports from beside itself load in the job, not only from its working directory."""
        from hydra_preempt.doors.submitit import PortableCallable

        return {**self.__dict__, "task_function": PortableCallable(self.task_function) if self.task_function else None}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        carried = state["task_function"]
        self.__dict__.update(state, task_function=carried.fn if carried is not None else None)

    # -- inside the job ------------------------------------------------------------
    def __call__(
        self,
        sweep_overrides: List[str],
        job_num: int,
        job_dir: str,
        sweep_dir: str,
        subdir: str,
        singleton_state: Dict[type, Singleton],
    ) -> JobReturn:
        import submitit
        import torch.distributed

        from hydra_preempt.doors.submitit import RunFailed, init_from_job, job_ends_process
        from hydra_preempt.outcome import Outcome, Status
        from hydra_preempt.session.runner import JobContext, current_job
        from hydra_preempt.slurm.policy import RESUME_EXIT_CODES, conclude

        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(sweep_overrides))
        with read_write(sweep_config.hydra), open_dict(sweep_config.hydra):
            sweep_config.hydra.job.id = submitit.JobEnvironment().job_id
            sweep_config.hydra.job.num = job_num
            # the directory resolved at launch: a requeue writes where the first start did. Set only where
            # the job's own config resolves otherwise, so that hydra.yaml keeps e.g. subdir: ${hydra.job.num}/run
            for key, value in zip(("dir", "subdir"), _pinned_sweep_dirs(job_dir, sweep_dir, subdir)):
                if (
                    str(OmegaConf.select(sweep_config, f"hydra.sweep.{key}", throw_on_resolution_failure=False))
                    != value
                ):
                    sweep_config.hydra.sweep[key] = value
        created_group = init_from_job("auto")
        outcomes: List[Outcome] = []
        job = JobContext(budget=self._budget(), on_outcome=outcomes.append, ends_process=job_ends_process())
        token = current_job.set(job)
        try:
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        finally:
            current_job.reset(token)
            # its threads must end before the process does (an abort at exit otherwise); the task function
            # may have destroyed it already, as a DDP script's last line does
            if created_group and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        value = ret.return_value  # a task that raised raises here: the job ends FAILED with its traceback
        outcome = value if isinstance(value, Outcome) else (outcomes[-1] if outcomes else None)
        if outcome is None or outcome.status is Status.FINISHED:
            return ret
        code = conclude(outcome)
        if code in RESUME_EXIT_CODES:
            sys.exit(code)  # no result pickle: submitit and SLURM see a job that will run again (or was cancelled)
        raise RunFailed(f"job #{job_num} {outcome.status.value} at step {outcome.step}: {outcome.message}")

    def _budget(self) -> Any:
        """The app's requeue section, with the launcher's max_preemptions/max_timeouts where they are set."""
        from hydra_preempt.slurm.stop import RequeueBudget

        assert self.config is not None
        section = OmegaConf.select(self.config, "requeue", default=None)
        values = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else {}
        assert isinstance(values, dict)
        for key in ("max_preemptions", "max_timeouts"):
            if self.params.get(key) is not None:
                values[key] = self.params[key]
        known = {k: v for k, v in values.items() if k in ("max_preemptions", "max_timeouts")}
        return RequeueBudget(**known)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue request: the same job, which resumes from its run directory."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    # -- on the submitting side -------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_preempt.errors import HydraPreemptError

        guard = sys.modules.get("hydra_preempt.guard")  # the app imported it; this process is the sweep's driver
        if guard is not None:
            guard.release()
        try:
            return self._launch(job_overrides, initial_job_idx)
        except HydraPreemptError as e:
            # a user's mistake, caught before anything was submitted: its message, no traceback
            print(f"Error in hydra/launcher={self._config_name()}: {e}", file=sys.stderr)
            sys.exit(2)

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_preempt.doors import hydra_sweep as sweep
        from hydra_preempt.doors.settings import ExecutorSettings
        from hydra_preempt.doors.submitit import executor_for
        from hydra_preempt.errors import ConfigError

        assert self.config is not None and self.hydra_context is not None
        p = self.params
        unknown = sorted(set(p) - {f.name for f in dataclasses.fields(PreemptLauncherConf)})
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join('hydra.launcher.' + k for k in unknown)}")
        settings = ExecutorSettings(**{k: p[k] for k in ExecutorSettings.keys()})  # noqa: SIM118 (a classmethod, not dict.keys)
        settings.validate()
        self._budget()
        failures = self._failure_table()
        self._check_signal_matches_app()
        sweep_dir_as_given = str(self.config.hydra.sweep.dir)
        sweep_dir = Path(sweep_dir_as_given).absolute()
        planned = []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            subdir = self._subdir(list(overrides), num)
            planned.append(sweep.SweepJob(num, list(overrides), str(sweep_dir / subdir), p["cluster"], subdir=subdir))
        recorded = sweep.load_manifest(sweep_dir)
        sweep.check_same_sweep(sweep_dir, recorded, planned)
        finished, active, to_submit = self._triage(planned, recorded)
        log.info(
            "preempt_%s sweep in %s: %d job(s) to submit, %d finished, %d still with the scheduler",
            p["cluster"],
            sweep_dir,
            len(to_submit),
            len(finished),
            len(active),
        )
        for job in planned:
            mark = (
                "finished, skipped"
                if job in finished
                else f"still {active[job.num]}, not resubmitted"
                if job.num in active
                else "submitting"
            )
            log.info("\t#%d : %s  (%s)", job.num, " ".join(filter_overrides(job.overrides)), mark)
        submitted = []
        if to_submit:
            executor = executor_for(p["submitit_folder"], settings)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            state = Singleton.get_state()
            args = [(job.overrides, job.num, job.dir, sweep_dir_as_given, job.subdir, state) for job in to_submit]
            submitted = executor.map_array(self, *zip(*args))
            for job, handle in zip(to_submit, submitted):
                job.job_id = str(handle.job_id)
        manifest = sweep.save_manifest(sweep_dir, {**recorded, **{job.num: job for job in planned}})
        if not p["wait"]:
            log.info("submitted; manifest %s; follow with: hydra-preempt status %s", manifest, sweep_dir)
            # Hydra's sweeper asserts on UNKNOWN: the launch itself completed; the value says what was done
            return [
                self._job_return(job, JobStatus.COMPLETED, {"job_id": job.job_id, "dir": job.dir}) for job in planned
            ]
        if p["cluster"] == "slurm":
            self._restart_failures(sweep_dir, [job for job in planned if job not in finished and job.job_id], failures)
        handles = {job.num: h for job, h in zip(to_submit, submitted)}
        return [self._wait_for(job, handles.get(job.num), job in finished) for job in planned]

    def _failure_table(self) -> Any:
        """The app's failure table (its `failures.table`, else the shipped one), checked before anything is submitted."""
        from hydra_preempt.slurm.failures import FailureTable

        assert self.config is not None
        return FailureTable.load(OmegaConf.select(self.config, "failures.table", default=None))

    def _restart_failures(self, sweep_dir: Path, jobs: list, failures: Any) -> None:
        """Until every job has ended for good: judge each end and requeue the failures the restart policy
        restarts (a killed process, a node failure), as `hydra-preempt monitor SWEEP_DIR` does."""
        from hydra_preempt.doors.monitor import Monitor, MonitorBusyError, Slurm, Watched

        try:
            monitor = Monitor(sweep_dir, failures, Slurm(), [Watched(Path(job.dir), job.job_id) for job in jobs])
        except MonitorBusyError as e:
            log.info("%s: restarts after failures are left to it", e)
            return
        try:
            while True:
                for line in monitor.poll():
                    log.info("%s", line)
                if monitor.settled:
                    return
                time.sleep(_POLL_S)
        finally:
            monitor.close()

    def _triage(self, planned: list, recorded: dict) -> tuple[list, dict[int, str], list]:
        """(finished, {num: scheduler state of jobs still held}, to submit) for a run of the same sweep."""
        from hydra_preempt.doors import hydra_sweep as sweep

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
        from hydra_preempt.doors import hydra_sweep as sweep

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
        if standing.status == "not started":  # no run log: a task function that does not call hydra_preempt.run()
            what = f"failed: {job_error}" if job_error else f"ended without a result (no run log in {job.dir})"
            error = SweepJobError(f"job #{job.num} ({job.job_id}) {what}")
            return self._job_return(job, JobStatus.FAILED, error)
        detail = f"\n{job_error}" if job_error else ""
        error = SweepJobError(
            f"job #{job.num} ({job.job_id}) ended {standing.status}: {standing.message}; run directory {job.dir}{detail}"
        )
        return self._job_return(job, JobStatus.FAILED, error)

    def _job_return(self, job: Any, status: JobStatus, value: Any = None) -> JobReturn:
        assert self.config is not None
        ret = JobReturn(
            overrides=job.overrides, working_dir=job.dir, task_name=str(self.config.hydra.job.name), status=status
        )
        ret._return_value = value
        return ret

    def _subdir(self, overrides: list[str], num: int) -> str:
        """The job's output directory relative to the sweep dir, resolved once here so that requeues reuse it."""
        from omegaconf.errors import OmegaConfBaseException

        from hydra_preempt.errors import ConfigError

        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.job.num = num
        try:
            return str(OmegaConf.select(cfg, "hydra.sweep.subdir", throw_on_missing=True))
        except OmegaConfBaseException as e:
            reason = str(e).splitlines()[0]
            raise ConfigError(
                f"hydra.sweep.subdir cannot be resolved before the job is submitted ({reason}): a preemptible job's "
                "directory must be known at launch so that every requeue finds it; use ${hydra.job.num} or the "
                "job's overrides (${hydra.job.override_dirname}), not ${hydra.job.id}"
            ) from None

    def _check_signal_matches_app(self) -> None:
        from hydra_preempt.errors import ConfigError
        from hydra_preempt.session.signals import parse_signal

        assert self.config is not None
        app_signal = OmegaConf.select(self.config, "signals.timeout", default=None)
        mine = parse_signal(self.params["signal"], "signal").name
        if app_signal is not None and parse_signal(str(app_signal), "signals.timeout").name != mine:
            raise ConfigError(
                f"signal={self.params['signal']} but the app's signals.timeout={app_signal}: the time-limit warning would not be caught"
            )

    def _config_name(self) -> str:
        return "preempt_local" if self.params.get("cluster") == "local" else "preempt_slurm"


def _pinned_sweep_dirs(job_dir: str, sweep_dir: str, subdir: str) -> tuple[str, str]:
    """(hydra.sweep.dir, hydra.sweep.subdir) for a job pinned to `job_dir` (absolute, chosen at launch).

    As Hydra's BasicLauncher shows them: the sweep directory as given and the subdir relative to it,
    when they still lead to `job_dir` from this process's working directory (run_job takes
    abspath(join(dir, subdir))); else the launch's absolute sweep directory with the same subdir.
    """
    if os.path.abspath(os.path.join(sweep_dir, subdir)) == os.path.abspath(job_dir):
        return sweep_dir, subdir
    depth = len(Path(subdir).parts)
    return (str(Path(job_dir).parents[depth - 1]) if depth else job_dir), subdir
