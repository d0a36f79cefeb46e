"""run(): a training function under the stop protocol, with the run log and, inside SLURM, the stop policy.

A front door tells `run()` about its job with a `JobContext`, passed as an
argument. Where user code sits between the door and `run()` (a Hydra task
function started by the launcher), the door sets `current_job` instead: the
one piece of context state in the library, a `contextvars.ContextVar`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import faulthandler
import io
import logging
import multiprocessing
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..config import SessionConfig
from ..distributed import world
from ..errors import CheckpointReadError, CheckpointWriteError, ConfigError, HydraPreemptError
from ..fsutil import create_file
from ..outcome import EXIT_CODES, ExitCode, Outcome, Status
from ..rundir import JobIdentity, RunHistory, RunLog
from ..slurm.commands import SlurmError
from ..slurm.env import SlurmTask, SrunStep
from ..slurm.failures import FailureTable, RestartDecision, classify_exception, decide
from ..slurm.policy import KILL_MARGIN_S, SlurmStopPolicy, conclude, requeue_recorded
from ..slurm.stop import RequeueBudget, Requeuer, budget_exhausted
from .api import RunStopped, Session
from .child_signals import end_children_of_stopped_run
from .signals import Request, SignalRequests
from .srun import srun_process_group
from .watchdog import HangReport

log = logging.getLogger("hydra_preempt")

# A stuck process ends after this long even if ending it cleanly blocks (scontrol, a flush).
HANG_EXIT_BACKSTOP_S = 120.0
# A rank other than 0 that ends stuck waits this long first, so that rank 0 records the run's end.
OTHER_RANK_EXIT_DELAY_S = 3.0
# A hung process lets a background write in flight end for this long, so that it names the checkpoint on disk.
HANG_WRITE_WAIT_S = 30.0


@dataclass(frozen=True)
class JobContext:
    """What the front door that started a run knows about its job.

    budget:      replaces the config's `requeue` section (e.g. the launcher's max_preemptions/max_timeouts).
    slurm_task:  the SLURM task this process is; read from the environment unless given (None: not SLURM).
                 Inside SLURM, run() classifies stops and reads the job's restart count from the scheduler.
    srun_step:   the srun step of several tasks this process is one of (None: none); its tasks become
                 the ranks of one process group (session/srun.py) unless `distributed.srun` is false.
    on_outcome:  receives the outcome of run() (a launcher concludes it even if the task function
                 does not return it).
    ends_process: the process exits right after run() (a job of a door, a script's main that calls
                 exit_with). A finished run then keeps dropping stop signals until the exit, so that a
                 late SIGTERM cannot turn exit code 0 into a kill; otherwise (run() inside a program
                 that goes on) run() restores the program's own handlers before it returns.
    """

    budget: RequeueBudget | None = None
    slurm_task: SlurmTask | None = field(default_factory=SlurmTask.from_env)
    srun_step: SrunStep | None = field(default_factory=SrunStep.from_env)
    on_outcome: Callable[[Outcome], None] | None = None
    ends_process: bool = False


# Set by a door around user code that calls run() (the Hydra launcher around the task function).
current_job: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "hydra_preempt_current_job", default=None
)


def run(
    train_fn: Callable[[Session], Any],
    run_dir: Path | str,
    config: SessionConfig | Mapping[str, Any] | None = None,
    job: JobContext | None = None,
) -> Outcome:
    """Run `train_fn(session)` with signal handling, checkpoints and the run log; never raises for a stop.

    The outcome's exit_code tells a scheduler what happened (see outcome.ExitCode).
    Inside a SLURM job the stop is classified (preemption, time limit, scancel)
    before it is written to the run log; `conclude(outcome)` then requeues when
    that is the job's part. A run whose requeue budget is spent fails at once.
    `job` defaults to `current_job`, else to what the environment says. `config`: a SessionConfig, or
    a mapping of its sections (`{"checkpoint": {"every_steps": 100}}`). A dict the training function
    returns is written to RUN_DIR/result.json, unless it wrote one itself (`session.write_result`).
    Without logging set up by the program, progress and events go to stderr (`progress.console`).
    """
    if isinstance(config, Mapping):
        try:
            config = SessionConfig.from_mapping(config)
        except ConfigError as e:
            return _refused(e, run_dir)
    elif config is not None and not isinstance(config, SessionConfig):
        why = f"run(): config must be a SessionConfig or a mapping of its sections, not {type(config).__name__}"
        return _refused(ConfigError(why), run_dir)
    config = config or SessionConfig()
    job = job or current_job.get() or JobContext()
    # Stop signals are heard from here on, before the slow set-up (the process group, the failure table,
    # the session): a preemption during start-up is a stop in the run log, not a kill by SIGTERM.
    signals = SignalRequests(config.signals.preempt, config.signals.timeout)
    try:
        signals.install()
    except ConfigError as e:
        return _refused(e, run_dir)
    outcome: Outcome | None = None
    children_before = set(multiprocessing.active_children())
    try:
        with console_log(config.progress.console), contextlib.ExitStack() as group:
            try:
                group.enter_context(srun_process_group(config.distributed, job.srun_step))
            except HydraPreemptError as e:
                return _refused(e, run_dir)
            group.enter_context(quiet_other_ranks())
            outcome = _run(train_fn, run_dir, config, job, signals)
            stopped = outcome.status in (Status.PREEMPTED, Status.TIMEOUT, Status.CANCELLED)
            if stopped and (ended := end_children_of_stopped_run(children_before)):
                log.info("ended %d worker process(es) the run had started and left running", ended)
            log.log(
                logging.ERROR if outcome.status is Status.FAILED else logging.INFO,
                "%s at step %d (exit code %d): %s",
                outcome.status.value,
                outcome.step,
                outcome.exit_code,
                outcome.message,
            )
        return outcome
    finally:
        # a finished run of a process that ends next keeps dropping stop signals (Session.close);
        # otherwise the program's own handlers again (a no-op where the session restored them)
        if not (job.ends_process and outcome is not None and outcome.status is Status.FINISHED):
            signals.uninstall()


@contextlib.contextmanager
def console_log(enabled: bool) -> Iterator[None]:
    """While a run lasts, the library's records (progress, resumed, saved, stopped) go to stderr if the
    program has set up no logging of its own (no handler on the root logger or the library's): a plain
    script then shows them, as Lightning's and HF Trainer's do. A program that set up logging gets them
    through its handlers alone, never twice."""
    library = logging.getLogger("hydra_preempt")
    if not enabled or logging.getLogger().handlers or library.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[hydra_preempt] %(message)s"))
    level = library.level
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(level)


@contextlib.contextmanager
def quiet_other_ranks() -> Iterator[None]:
    """While a run lasts, the library's INFO records (resumed, saved, finished) come from rank 0 alone:
    the other ranks keep WARNING and up, so that a job log holds each event once, not once per rank."""
    library = logging.getLogger("hydra_preempt")
    level = library.level
    if world()[0] != 0:
        library.setLevel(logging.WARNING)
    try:
        yield
    finally:
        library.setLevel(level)


def _run(
    train_fn: Callable[[Session], Any],
    run_dir: Path | str,
    config: SessionConfig,
    job: JobContext,
    signals: SignalRequests,
) -> Outcome:
    try:
        failures = FailureTable.load(config.failures.table)
    except ConfigError as e:
        return _refused(e, run_dir)
    session = Session(run_dir, config, signals=signals)
    try:
        session.open()
    except HydraPreemptError as e:
        return _refused(e, run_dir)
    try:
        session.wait_for_run_lock(None if config.distributed.srun else job.srun_step)
    except RunStopped as stop:  # the run belongs to another process: leave its log alone
        session.close()
        return Outcome(stop.status, 0, EXIT_CODES[stop.status], stop.message, run_dir=str(session.run_dir))
    except HydraPreemptError as e:  # the lock file cannot be used
        session.close()
        return _refused(e, run_dir)
    try:
        session.prepare()
    except HydraPreemptError as e:
        session.close()
        return _refused(e, run_dir)
    history = RunHistory.read(session.run_dir)  # read under the lock: no other process adds to it now
    budget = job.budget or config.requeue
    policy = None
    identity = JobIdentity()
    if job.slurm_task is not None:
        stops = {reason: history.stop_count(reason) for reason in ("preempted", "timeout")}
        policy = SlurmStopPolicy.start(
            job.slurm_task,
            stops,
            budget,
            session.signals.preempt_signal.name,
            session.signals.timeout_signal.name,
            lambda name: decide(failures, name, history.failure_count(name) + 1),
        )
        session.seconds_left = policy.seconds_left
        identity = policy.identity
    run_log = RunLog(session.run_dir, identity) if world()[0] == 0 else None  # one run log per run, not per rank
    if run_log:
        run_log.append(
            "start",
            checkpoint_dir=str(session.checkpointer.store.directory.absolute()),
            run_dir=str(Path(session.run_dir).absolute()),  # so that a moved or copied run finds its own
        )
    hang_decision = decide(failures, Status.HANG.value, history.failure_count(Status.HANG.value) + 1)
    ending = _ProcessEnd(session, run_log, job.slurm_task, hang_decision, policy, identity)
    session.watchdog.start(ending.end, session.stop_allowance_s)  # hangs watched if watchdog.enabled, stops always
    spent = budget_exhausted(
        budget, history.stop_count("preempted"), history.stop_count("timeout")
    ) or _refused_restart(history, identity)
    outcome: Outcome | None = None
    try:
        if spent:
            raise RunStopped(Status.FAILED, spent)
        session.stop_if_requested()
        result = train_fn(session)
        session.save_final()
        if isinstance(result, Mapping) and not session.result_written:
            session.write_result(dict(result))
        if session.result_error:  # the work is in the final checkpoint: a restart writes the result again
            why = f"{session.result_error}; the final checkpoint of step {session.step} is saved, run again to write it"
            outcome = Outcome(Status.FAILED, session.step, ExitCode.FAILED, why, result)
        else:
            outcome = Outcome(Status.FINISHED, session.step, ExitCode.FINISHED, "finished", result)
    except RunStopped as ended:
        outcome = _stopped(ended, session.step)
    except (CheckpointWriteError, CheckpointReadError) as e:  # said once, by run()'s last line
        behind = session.stop_behind(e)
        outcome = (
            _stopped(behind, session.step) if behind else Outcome(Status.FAILED, session.step, ExitCode.FAILED, str(e))
        )
    except HydraPreemptError as e:
        outcome = Outcome(Status.FAILED, session.step, ExitCode.USAGE, str(e))
    except (Exception, SystemExit, KeyboardInterrupt) as e:
        # sys.exit() or a KeyboardInterrupt of the training function's own (SIGINT is the session's:
        # a cancel) ends it like any exception in user code: written down and classified, so that a
        # monitor does not take a run that stopped without a word for a killed one and restart it;
        # unless a stop signal came first: then it is that stop's (a child died of the same signal)
        trace = traceback.format_exc()
        behind = session.stop_behind(e)
        if behind is not None:
            outcome = _stopped(behind, session.step)
        else:
            log.error("training failed at step %d:\n%s", session.step, trace)
            saved, why_not = session.emergency_save()
            if why_not:
                log.error("no emergency checkpoint: %s", why_not)
            note = f"; emergency checkpoint at step {saved.step}" if saved else ""
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            outcome = _failed(session.step, f"{what}{note}", trace, failures, history)
    finally:
        # Only a finished run holds its stop signals: after any other outcome there is work left
        # (a requeue, waiting for SLURM's kill) that a second signal may still end.
        session.close(finished=outcome is not None and outcome.status is Status.FINISHED)
    assert outcome is not None  # every path of the try sets it or raises
    outcome.run_dir = str(session.run_dir)
    outcome.job = identity if job.slurm_task is not None else None
    if policy is not None:
        outcome = policy.classify(outcome)
    if job.on_outcome is not None:
        job.on_outcome(outcome)
    if run_log:
        run_log.append(
            "stop",
            reason=outcome.status.value,
            exit_code=int(outcome.exit_code),
            resumed_from=session.resumed_from,
            step=outcome.step,
            checkpoint_step=session.last_checkpoint.step if session.last_checkpoint else None,
            signal_to_saved_s=session.signal_to_saved_s,
            message=outcome.message,
            **_failure_fields(outcome),
        )
    return outcome


def _stopped(stop: RunStopped, step: int) -> Outcome:
    return Outcome(
        stop.status, step, EXIT_CODES[stop.status], stop.message, signal=stop.signal, signal_time=stop.signal_time
    )


def _failed(step: int, message: str, trace: str, failures: FailureTable, history: RunHistory) -> Outcome:
    """The outcome of an exception in the training function: its failure class (from the traceback's
    text) and the restart policy's decision. A class to restart within its budget (an NCCL error)
    ends like a preemption: exit 75, requeued inside SLURM; any other fails, with the reason."""
    name, evidence = classify_exception(failures, trace)
    decision = decide(failures, name, history.failure_count(name) + 1)
    code = ExitCode.REQUEUE if decision.restart else ExitCode.FAILED
    return Outcome(
        Status.FAILED,
        step,
        code,
        f"{message}; {decision.reason}",
        requeue_by=Requeuer.SELF.value if decision.restart else None,
        failure=name,
        evidence=evidence,
        restart_reason=decision.reason,
    )


def _refused_restart(history: RunHistory, identity: JobIdentity) -> str | None:
    """Why this start must not train: SLURM requeued this same job after a failure the restart policy
    said not to restart (node_fail beyond its budget: SLURM requeues a requeueable job on a node failure
    whatever we decide). A new job (a person running it again) is never refused."""
    last = history.last_stop
    if not last or last.get("restart", True) or last.get("failure") != "node_fail":
        return None
    if identity.job_id is None or last.get("job_id") != identity.job_id:
        return None
    return f"not restarted: {last.get('restart_reason') or 'node_fail'} (SLURM requeued the job after a node failure)"


def _failure_fields(outcome: Outcome) -> dict[str, Any]:
    """The run log's record of a failure's class and restart decision (RunHistory.failure_count counts them)."""
    if outcome.failure is None:
        return {}
    return {
        "failure": outcome.failure,
        "evidence": outcome.evidence or "",
        "restart": outcome.exit_code == ExitCode.REQUEUE,
        "restart_reason": outcome.restart_reason or "",
    }


class _ProcessEnd:
    """On the watchdog's thread: end a process whose training thread cannot be waited for any longer
    (one owner for both cases, so that they end the same way):

    - a hang (no progress for its allowance): a `hang` stop, exit 76, requeued if the restart policy
      says so;
    - a stop signal whose run has not ended shortly before the kill (stuck in a collective whose peer
      died, in user code that does not return): the stop the signal asked for (preempted, timeout,
      cancelled: classified under SLURM as at a boundary) with nothing saved, exit 75 (130 for a
      cancel), requeued as a preemption stop is (`conclude`).

    Nothing is saved from a stuck state: the last checkpoint stands. Every thread's stack is dumped.
    This takes no lock the stuck training thread may hold: the message goes to fd 2 with os.write, the
    run log and the stack file are appended by file descriptor, scontrol is a subprocess; if any of it
    blocks all the same, a backstop thread ends the process. Only rank 0 writes the run log and
    requeues (a hang of a collective hangs every rank); every rank dumps its stacks and exits.
    """

    def __init__(
        self,
        session: Session,
        run_log: RunLog | None,
        task: SlurmTask | None,
        hang_decision: RestartDecision,
        policy: SlurmStopPolicy | None,
        identity: JobIdentity,
    ) -> None:
        self.session = session
        self.run_log = run_log
        self.task = task
        self.hang_decision = hang_decision
        self.policy = policy
        self.identity = identity

    def end(self, report: HangReport) -> None:
        arrived = self.session.signals.arrived() if report.stop else None
        code = int(
            ExitCode.HANG
            if arrived is None
            else ExitCode.CANCELLED
            if arrived[0] is Request.CANCEL
            else ExitCode.REQUEUE
        )
        # a stop may wait for SLURM's kill (PreemptMode=REQUEUE requeues only a job it kills): past it
        backstop = HANG_EXIT_BACKSTOP_S + (KILL_MARGIN_S if report.stop else 0.0)
        threading.Thread(target=_exit_after, args=(backstop, code), daemon=True).start()
        try:
            code = self._record_stop(report) if report.stop else self._record_hang(report)
            if world()[0] != 0:
                # rank 0's collective waits for this rank, and its own watchdog sees the same hang or stop
                # within a look or two: exiting at once would fail that collective first, and rank 0 would
                # record a lost peer instead of what happened
                time.sleep(OTHER_RANK_EXIT_DELAY_S)
        finally:  # whatever failed on the way (a full disk), the stuck process ends
            for handler in logging.getLogger().handlers + log.handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _dump_stacks(self, what: str) -> str:
        """Every thread's stack into RUN_DIR/hang-stacks-*.txt (else the job's stderr): where it is."""
        rank = world()[0]
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        stacks = self.session.run_dir / f"hang-stacks-{stamp}{f'-rank{rank}' if rank else ''}.txt"
        try:
            with create_file(stacks) as binary, io.TextIOWrapper(binary, encoding="utf-8") as f:
                f.write(f"{what}; the stack of every thread:\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
                os.fsync(f.fileno())
            return stacks.name
        except OSError as e:  # the run directory cannot take them: the job's log can
            os.write(2, f"hydra_preempt: cannot write {stacks} ({e.strerror or e}); the stacks:\n".encode())
            faulthandler.dump_traceback(2, all_threads=True)
            return "the job's stderr"

    def _record_hang(self, report: HangReport) -> int:
        session, decision, code = self.session, self.hang_decision, int(ExitCode.HANG)
        what = f"no progress for {report.waited_s:.0f} s in the {report.phase} after step {session.step}"
        stacks_at = self._dump_stacks(f"{what} (allowed {report.allowed_s:.0f} s)")
        checkpoint = session.checkpointer.standing(HANG_WRITE_WAIT_S)  # one a write in flight may have replaced
        where = f"the checkpoint of step {checkpoint.step} stands" if checkpoint else "no checkpoint yet"
        message = f"hang: {what}; stacks in {stacks_at}; nothing saved, {where}; {decision.reason}"
        os.write(2, f"hydra_preempt: {message}; ending the process (exit {code})\n".encode())
        if self.run_log is None:
            return code
        self.run_log.append(
            "stop",
            reason=Status.HANG.value,
            exit_code=code,
            resumed_from=session.resumed_from,
            step=session.step,
            checkpoint_step=checkpoint.step if checkpoint else None,
            message=message,
            stacks=stacks_at,
            failure=Status.HANG.value,
            evidence=f"watchdog: {what}",
            restart=decision.restart,
            restart_reason=decision.reason,
        )
        if self.task is not None and decision.restart:
            try:
                requeue_recorded(self.task.job_id, self.run_log, step=session.step)
            except SlurmError as e:
                os.write(2, f"hydra_preempt: requeueing job {self.task.job_id} failed: {e}\n".encode())
        return code

    def _record_stop(self, report: HangReport) -> int:
        session = self.session
        arrived = session.signals.arrived()
        assert arrived is not None  # a stop report comes only after a stop signal
        request, signum = arrived
        status = Status.CANCELLED if request is Request.CANCEL else Status.PREEMPTED
        where = f"in the {report.phase} after step {session.step}{_main_thread_frame()}"
        stacks_at = self._dump_stacks(
            f"{signum.name} received {report.waited_s:.0f} s ago and the run has not stopped (allowed "
            f"{report.allowed_s:.0f} s, until shortly before the kill): stuck {where}"
        )
        checkpoint = session.checkpointer.standing(0.0)  # no time to wait for a write in flight: the kill is near
        standing = f"the checkpoint of step {checkpoint.step} stands" if checkpoint else "no checkpoint yet"
        outcome = Outcome(
            status,
            session.step,
            EXIT_CODES[status],
            f"{signum.name} received: nothing saved: the training thread did not reach a step boundary "
            f"(stuck {where}; stacks in {stacks_at}); {standing}",
            signal=signum.name,
            signal_time=session.signals.first_received.get(request, time.time() - report.waited_s),
            run_dir=str(session.run_dir),
            job=self.identity if self.task is not None else None,
        )
        if self.policy is not None:
            outcome = self.policy.classify(outcome)
        os.write(2, f"hydra_preempt: {outcome.message}; ending the process (exit {int(outcome.exit_code)})\n".encode())
        if self.run_log is not None:
            self.run_log.append(
                "stop",
                reason=outcome.status.value,
                exit_code=int(outcome.exit_code),
                resumed_from=session.resumed_from,
                step=session.step,
                checkpoint_step=checkpoint.step if checkpoint else None,
                message=outcome.message,
                stacks=stacks_at,
                **_failure_fields(outcome),
            )
        return conclude(outcome)  # the requeue a preemption stop makes (rank 0), or waiting for SLURM's


def _main_thread_frame() -> str:
    """', in all_reduce (distributed_c10d.py:2806)': the Python frame the main thread is in, or ''."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None:
        return ""
    return f", in {frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"


def _exit_after(seconds: float, code: int) -> None:
    time.sleep(seconds)
    os._exit(code)


def _refused(error: HydraPreemptError, run_dir: Path | str) -> Outcome:
    """A run that could not start (bad configuration, unusable directories): one line, exit 2."""
    log.error("%s", error)
    return Outcome(Status.FAILED, 0, ExitCode.USAGE, str(error), run_dir=str(run_dir))
