"""The session: the only thing a training function talks to.

    def train(session):
        model, opt = ..., ...
        session.register(model=model, optimizer=opt, data=ResumableLoader(...))
        session.restore()                      # 0, or the step to continue from
        for step in session.steps(max_steps):  # stops at a step boundary on a signal
            ...
            session.report(loss=loss.item())
        return {...}

    outcome = hydra_preempt.run(train, run_dir, config)   # Outcome(status, step, exit_code, ...)

Work happens only at step boundaries, where the state is consistent:
finish the step -> judge divergence -> save if asked or due -> stop if asked.

Multi-rank (torch.distributed initialised before run()): every
`distributed.sync_every` steps the ranks agree (one all-reduce of a few
flags) on stopping, saving and divergence, so all stop at the same step.
Rank 0 writes one checkpoint holding the shared objects (registered with
`register`, e.g. a DDP model and its optimizer) and every rank's own state
(`register_per_rank`, e.g. its data shard position, and its RNGs).
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .checkpoint import CheckpointInfo, CheckpointStore, RetentionPolicy, Snapshot
from .config import SessionConfig
from .distributed import agree, broadcast_from_rank0, gather_to_rank0, world
from .divergence import LossSpikeDetector, Verdict
from .errors import CheckpointDirError, CheckpointMismatchError, CheckpointWriteError, ConfigError, HydraPreemptError
from .fsutil import atomic_write_text
from .outcome import EXIT_CODES, ExitCode, Outcome, Status
from . import preemption
from .preemption import SlurmStopPolicy, effective_budget, stop_counts
from .runlog import append_event, read_events
from .signals import Request, SignalRequests
from .state import capture_rng, restore_rng

log = logging.getLogger("hydra_preempt")

METRICS_LOG = "metrics.jsonl"
RESULT_FILE = "result.json"
RUN_LOCK = ".run.lock"


class RunStopped(BaseException):
    """Raised out of `Session.steps()` at a step boundary to end the training function.

    A BaseException, so that a training loop's `except Exception` does not swallow it.
    """

    def __init__(self, status: Status, message: str, signal: str | None = None, signal_time: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.signal = signal
        self.signal_time = signal_time


@dataclass
class _StepStart:
    """What an emergency checkpoint needs from the boundary a step started at."""

    step: int
    fingerprint: tuple
    rng: dict
    copied: dict[str, Any]  # state_dict() of objects that are not checked in place


class Session:
    """`seconds_left`, when given, tells how long until the process will be killed (grace end or time
    limit); a stop then skips a save that could not finish in time, if a checkpoint already exists."""

    def __init__(self, run_dir: Path | str, config: SessionConfig | None = None, seconds_left: Callable[[], float | None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.seconds_left = seconds_left
        self.config = config or SessionConfig()
        c = self.config.checkpoint
        directory = Path(c.dir) if Path(c.dir).is_absolute() else self.run_dir / c.dir
        self.store = CheckpointStore(directory, RetentionPolicy(c.keep_last, c.keep_best, c.metric, c.mode))  # type: ignore[arg-type]
        d = self.config.divergence
        self.detector = LossSpikeDetector(d.window, d.factor, d.patience, d.min_history) if d.enabled else None
        self.signals = SignalRequests(self.config.signals.preempt, self.config.signals.timeout)
        self.step = 0  # completed steps
        self.resumed_from: int | None = None
        self.last_checkpoint: CheckpointInfo | None = None
        self.metrics: dict[str, float] = {}  # latest value of every reported metric
        self.signal_to_saved_s: float | None = None
        self.last_save_s: float | None = None  # duration of this process's last save
        self._objects: dict[str, Any] = {}
        self._per_rank: set[str] = set()  # names registered with register_per_rank
        self._restored = False
        self._step_metrics: dict[str, float] = {}
        self._last_step_metrics: dict[str, float] = {}
        self._last_save_time = time.monotonic()
        self._last_save_wall = 0.0  # time.time() at the end of the last save
        self._periodic_pending = False
        self._open_step: _StepStart | None = None
        self._lock_fd: int | None = None

    # -- life cycle (driven by run()) -------------------------------------
    def open(self) -> None:
        """Create the run directory, check the checkpoint directory, install the signal handlers."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointDirError(f"run directory {self.run_dir} is not usable: {e.strerror or e}") from None
        error = None
        if world()[0] == 0:
            try:
                self.store.prepare()
            except CheckpointDirError as e:
                error = e
        if agree([error is not None])[0]:
            raise error or CheckpointDirError(f"rank 0 cannot use the checkpoint directory {self.store.directory}")
        self.signals.install()

    def close(self) -> None:
        self.signals.uninstall()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def wait_for_run_lock(self, poll_s: float = 2.0) -> None:
        """One live run per run directory. A second process (a duplicate job, e.g. after an interrupted
        workflow was started again) waits here until the first one ends, then resumes from its state.
        A stop signal while waiting stops this process without touching the run."""
        if world()[0] != 0:
            return
        path = self.run_dir / RUN_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    log.warning("run directory %s is in use by %s: waiting for it to end", self.run_dir, holder)
                    announced = True
                for request, status in ((Request.CANCEL, Status.CANCELLED), (Request.PREEMPT, Status.PREEMPTED)):
                    if request in self.signals.peek():
                        os.close(fd)
                        raise RunStopped(status, f"stopped while waiting for {path}; the run is another process's") from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
        self._lock_fd = fd

    # -- the training function's API ----------------------------------------
    def register(self, **objects: Any) -> None:
        """Objects whose state is saved and restored together (model, optimizer, scheduler, scaler, data, ...)."""
        if self._restored:
            raise ConfigError("register() every object before restore() or steps(): later ones would not be restored")
        for name, obj in objects.items():
            if isinstance(obj, torch.Generator):
                obj = _GeneratorState(obj)
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise ConfigError(f"cannot register {name!r}: {type(obj).__name__} has no state_dict()/load_state_dict()")
            if name in self._objects:
                raise ConfigError(f"{name!r} is registered twice")
            self._objects[name] = obj

    def register_per_rank(self, **objects: Any) -> None:
        """Objects whose state differs between ranks (a data shard's position, ...): each rank's is saved."""
        self.register(**objects)
        self._per_rank.update(objects)

    def restore(self) -> int:
        """Load the newest good checkpoint into the registered objects; return the step to continue from."""
        if self._restored:
            return self.step
        self._restored = True
        rank = world()[0]
        loaded = self.store.load_latest() if rank == 0 else None
        chosen = broadcast_from_rank0(loaded[0].path.name if loaded else None)
        if chosen is None:
            log.info("no checkpoint in %s: starting at step 0", self.store.directory)
            return 0
        info, tree = loaded if loaded else self.store.load_named(chosen)
        self._load_tree(tree, info)
        self.step = self.resumed_from = int(tree["session"]["step"])
        self.last_checkpoint = info
        log.info("resumed from %s (step %d, saved on %s)", info.path.name, self.step, info.reason)
        return self.step

    def steps(self, max_steps: int) -> Iterator[int]:
        """Yield the index of each step to run, from the restored step up to `max_steps`."""
        self.restore()
        while self.step < max_steps:
            self._start_step()
            yield self.step
            self._end_step()

    def report(self, **metrics: Any) -> None:
        """Record metrics of the current step (floats, or 0-d tensors)."""
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        self._step_metrics.update(values)
        self.metrics.update(values)
        if world()[0] == 0:
            number = self.step + (1 if self._open_step else 0)
            with open(self.run_dir / METRICS_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": number, **values}) + "\n")

    def save(self, reason: str = "manual") -> CheckpointInfo | None:
        """Save now; only valid between steps (before the loop, after it, or from a callback at a boundary)."""
        if self._open_step is not None:
            raise ConfigError("save() inside a step would save a half-updated state; it runs at the step boundary by itself")
        return self._save(reason, self._last_step_metrics)

    def write_result(self, result: dict[str, Any]) -> Path:
        """Write result.json atomically (rank 0 only)."""
        path = self.run_dir / RESULT_FILE
        if world()[0] == 0:
            atomic_write_text(path, json.dumps(result, indent=1, sort_keys=True))
        return path

    @property
    def restarts(self) -> int:
        """How many times this run was started before the current start."""
        return max(0, sum(1 for e in read_events(self.run_dir) if e["event"] == "start") - 1)

    # -- step boundaries ------------------------------------------------------
    def _start_step(self) -> None:
        if not self.config.checkpoint.emergency:
            self._open_step = _StepStart(self.step, (), {}, {})
            return
        copied = {n: copy.deepcopy(o.state_dict()) for n, o in self._objects.items() if not _checked_in_place(o)}
        self._open_step = _StepStart(self.step, self._fingerprint(), capture_rng(), copied)

    def _end_step(self) -> None:
        self._open_step = None
        self.step += 1
        metrics, self._step_metrics = self._step_metrics, {}
        self._last_step_metrics = metrics
        verdict = self._judge(metrics)
        self._periodic_pending = self._periodic_pending or self._periodic_due()
        size = world()[1]
        if size > 1 and self.step % self.config.distributed.sync_every:
            return  # requests stay pending until the ranks next agree
        requests = self.signals.take()
        preempt, cancel, checkpoint, periodic, suspect, diverged = agree([
            Request.PREEMPT in requests, Request.CANCEL in requests, Request.CHECKPOINT in requests,
            self._periodic_pending, verdict is Verdict.SUSPECT, verdict is Verdict.DIVERGED,
        ])
        if diverged:
            why = self.detector.diverged_reason if self.detector and self.detector.diverged_reason else "the loss diverged on another rank"
            log.error("%s; stopping without saving this state (best checkpoints kept)", why)
            raise RunStopped(Status.DIVERGED, why)
        if periodic and suspect:
            log.warning("step %d: loss spike, deferring the periodic checkpoint until the loss recovers", self.step)
            periodic = False
        reason = "preempt" if preempt else "manual" if cancel or checkpoint else "periodic" if periodic else None
        if reason and (preempt or cancel) and agree([self._save_would_miss_deadline()])[0]:
            reason = None
        if reason:
            self._save(reason, metrics)
            late = self.signals.take()  # requests that came during the save are covered by it
            late_preempt, late_cancel = agree([Request.PREEMPT in late, Request.CANCEL in late])
            preempt, cancel = preempt or late_preempt, cancel or late_cancel
            requests = {**late, **requests}
        for stop, request, status in ((cancel, Request.CANCEL, Status.CANCELLED), (preempt, Request.PREEMPT, Status.PREEMPTED)):
            if stop:
                self._note_signal_latency(request)
                name = requests[request].name if request in requests else "a signal to another rank"
                saved = self.last_checkpoint.step if self.last_checkpoint else None
                state = f"state saved at step {self.step}" if saved == self.step else f"the checkpoint of step {saved} stands"
                raise RunStopped(status, f"{name} received: {state}", name, self.signals.first_received.get(request))

    def _judge(self, metrics: dict[str, float]) -> Verdict:
        if self.detector is None or self.config.divergence.metric not in metrics:
            return Verdict.OK
        return self.detector.update(metrics[self.config.divergence.metric], self.step)

    def _periodic_due(self) -> bool:
        c = self.config.checkpoint
        return bool(c.every_steps and self.step % c.every_steps == 0) or bool(
            c.every_seconds and time.monotonic() - self._last_save_time >= c.every_seconds
        )

    def _save_would_miss_deadline(self) -> bool:
        """True if a checkpoint exists and the next save, judged by the last one, would not finish in time."""
        if self.seconds_left is None or self.last_checkpoint is None or self.last_save_s is None:
            return False
        left = self.seconds_left()
        estimate = 1.5 * self.last_save_s + 1.0
        if left is None or estimate <= left:
            return False
        log.warning(
            "not saving at step %d: a save takes about %.1f s and only %.1f s are left before the kill; "
            "the checkpoint of step %d stands", self.step, estimate, left, self.last_checkpoint.step,
        )
        return True

    def _note_signal_latency(self, request: Request) -> None:
        received = self.signals.first_received.get(request)
        if received is not None and self._last_save_wall >= received:
            self.signal_to_saved_s = self._last_save_wall - received

    # -- saving and loading ---------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        return {"objects": {n: self._objects[n].state_dict() for n in self._per_rank}, "rng": capture_rng()}

    def _state_tree(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "objects": {name: obj.state_dict() for name, obj in self._objects.items() if name not in self._per_rank},
            "ranks": ranks,
            "session": {"step": self.step, "detector": self.detector.state_dict() if self.detector else None},
        }

    def _save(self, reason: str, metrics: dict[str, float], tree: dict[str, Any] | None = None) -> CheckpointInfo | None:
        """Save the current state (a collective on multi-rank runs: rank 0 writes), or `tree` if given."""
        step = tree["session"]["step"] if tree else self.step
        if self.last_checkpoint is not None and self.last_checkpoint.step == step:
            return self.last_checkpoint  # this state is on disk already
        started = time.monotonic()
        rank = world()[0]
        if tree is None:
            ranks = gather_to_rank0(self._rank_state())
            tree = self._state_tree(ranks) if ranks is not None else None
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        error: CheckpointWriteError | None = None
        if tree is not None:
            try:
                info = self.store.save(Snapshot.capture(tree), step, reason, metrics)
            except CheckpointWriteError as e:
                error = e
        if agree([error is not None])[0]:
            raise error or CheckpointWriteError(f"rank 0 could not write the checkpoint of step {step}")
        if rank != 0:
            info = CheckpointInfo(step=step, reason=reason, metrics=metrics, path=self.store.directory / f"step-{step:09d}")
        self._last_save_time = time.monotonic()
        self._last_save_wall = time.time()
        self.last_save_s = self._last_save_time - started
        self._periodic_pending = False
        self.last_checkpoint = info
        log.info("saved %s (%s, %.1f MB in %.2f s)", info.path.name, reason, info.nbytes / 1e6, self.last_save_s)
        return info

    def emergency_save(self) -> CheckpointInfo | None:
        """After an unhandled exception: save if the state is consistent, else explain why not."""
        if not self.config.checkpoint.emergency or not self._restored:
            return None
        if world()[1] > 1:
            log.error("no emergency checkpoint on a multi-rank run: the other ranks cannot be reached safely from an exception")
            return None
        start = self._open_step
        if start is None:
            tree = self._state_tree([self._rank_state()])
        elif start.fingerprint != self._fingerprint():
            log.error(
                "no emergency checkpoint: the exception came after step %d had changed the model or optimizer; "
                "the last checkpoint (step %s) stands", start.step + 1, self.last_checkpoint.step if self.last_checkpoint else "none",
            )
            return None
        else:  # nothing was updated yet: the state is the one the step started from
            objects = {n: o.state_dict() if _checked_in_place(o) else start.copied[n] for n, o in self._objects.items()}
            shared = {n: s for n, s in objects.items() if n not in self._per_rank}
            own = {n: s for n, s in objects.items() if n in self._per_rank}
            tree = {
                "objects": shared,
                "ranks": [{"objects": own, "rng": start.rng}],
                "session": {"step": start.step, "detector": self.detector.state_dict() if self.detector else None},
            }
        try:
            return self._save("emergency", {}, tree)
        except HydraPreemptError as e:
            log.error("emergency checkpoint failed: %s", e)
            return None

    def _fingerprint(self) -> tuple:
        """Version counters of every tensor a step updates in place: equal means unchanged."""
        parts: list = []
        for obj in self._objects.values():
            if isinstance(obj, torch.nn.Module):
                parts.extend(t._version for t in chain(obj.parameters(), obj.buffers()))
            elif isinstance(obj, torch.optim.Optimizer):
                parts.append(len(obj.state))
                for state in obj.state.values():
                    parts.extend(v._version if isinstance(v, torch.Tensor) else v for v in state.values())
            elif isinstance(obj, torch.amp.GradScaler):
                parts.extend(t._version if t is not None else None for t in (obj._scale, obj._growth_tracker))
        return tuple(parts)

    def _load_tree(self, tree: dict[str, Any], info: CheckpointInfo) -> None:
        rank, size = world()
        if len(tree["ranks"]) != size:
            raise CheckpointMismatchError(f"{info.path} was saved by {len(tree['ranks'])} rank(s), this run has {size}")
        own = tree["ranks"][rank]
        saved = {**tree["objects"], **own["objects"]}
        missing, unexpected = sorted(self._objects.keys() - saved.keys()), sorted(saved.keys() - self._objects.keys())
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{info.path} holds objects {sorted(saved)}, this run registered {sorted(self._objects)}"
                + (f"; not in the checkpoint: {missing}" if missing else "")
                + (f"; only in the checkpoint: {unexpected}" if unexpected else "")
            )
        problems = [p for name, obj in self._objects.items() for p in _mismatches(name, obj, saved[name])]
        if problems:
            raise CheckpointMismatchError(f"{info.path} does not fit this run's objects (nothing was loaded): " + "; ".join(problems))
        for name, obj in self._objects.items():
            try:
                obj.load_state_dict(saved[name])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise CheckpointMismatchError(f"{info.path}: loading {name!r} failed: {e}") from None
        restore_rng(own["rng"])
        if self.detector is not None and tree["session"].get("detector"):
            self.detector.load_state_dict(tree["session"]["detector"])


def _checked_in_place(obj: Any) -> bool:
    return isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler))


def _mismatches(name: str, obj: Any, saved: Any) -> list[str]:
    """Why `saved` cannot be loaded into `obj`, checked before anything is loaded."""
    if isinstance(obj, torch.nn.Module):
        current = obj.state_dict()
        problems = []
        if missing := sorted(current.keys() - saved.keys()):
            problems.append(f"{name}: keys missing from the checkpoint: {missing}")
        if unexpected := sorted(saved.keys() - current.keys()):
            problems.append(f"{name}: unexpected keys in the checkpoint: {unexpected}")
        for key in sorted(current.keys() & saved.keys()):
            if isinstance(saved[key], torch.Tensor) and tuple(saved[key].shape) != tuple(current[key].shape):
                problems.append(f"{name}.{key}: shape {tuple(saved[key].shape)} in the checkpoint, {tuple(current[key].shape)} in this model")
        return problems
    if isinstance(obj, torch.optim.Optimizer):
        mine, theirs = [len(g["params"]) for g in obj.param_groups], [len(g["params"]) for g in saved["param_groups"]]
        if mine != theirs:
            return [f"{name}: parameter groups of sizes {theirs} in the checkpoint, {mine} in this optimizer"]
    return []


class _GeneratorState:
    """Lets a torch.Generator be registered like any object with a state dict."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


def run(train_fn: Callable[[Session], Any], run_dir: Path | str, config: SessionConfig | None = None) -> Outcome:
    """Run `train_fn(session)` with signal handling, checkpoints and the run log; never raises for a stop.

    The outcome's exit_code tells a scheduler what happened (see outcome.ExitCode).
    Inside a SLURM job the stop is classified (preemption, time limit, scancel)
    before it is written to the run log; `preemption.conclude(outcome)` then
    requeues when that is the job's part. A run whose requeue budget
    (config.requeue) is spent fails at once.
    """
    config = config or SessionConfig()
    session = Session(run_dir, config)
    try:
        session.open()
    except HydraPreemptError as e:
        log.error("%s", e)
        return Outcome(Status.FAILED, 0, ExitCode.USAGE, str(e), run_dir=str(run_dir))
    try:
        session.wait_for_run_lock()
    except RunStopped as stop:  # the run belongs to another process: leave its log alone
        session.close()
        return Outcome(stop.status, 0, EXIT_CODES[stop.status], stop.message, run_dir=str(session.run_dir))
    counts = stop_counts(session.run_dir)  # read under the lock: no other process adds to it now
    budget = effective_budget(config.requeue)
    policy = SlurmStopPolicy.from_env(counts, budget, config.signals.preempt, config.signals.timeout)
    session.seconds_left = policy.seconds_left if policy else None
    logs = world()[0] == 0  # one run log per run, not per rank
    if logs:
        append_event(session.run_dir, "start", checkpoint_dir=str(session.store.directory.absolute()))
    spent = budget.exhausted(counts.get("preempted", 0), counts.get("timeout", 0))
    try:
        if spent:
            raise RunStopped(Status.FAILED, spent)
        result = train_fn(session)
        session._save("final", session._last_step_metrics)
        outcome = Outcome(Status.FINISHED, session.step, ExitCode.FINISHED, "finished", result)
    except RunStopped as stop:
        outcome = Outcome(stop.status, session.step, EXIT_CODES[stop.status], stop.message, signal=stop.signal, signal_time=stop.signal_time)
    except CheckpointWriteError as e:
        log.error("%s", e)
        outcome = Outcome(Status.FAILED, session.step, ExitCode.FAILED, str(e))
    except HydraPreemptError as e:
        log.error("%s", e)
        outcome = Outcome(Status.FAILED, session.step, ExitCode.USAGE, str(e))
    except Exception as e:
        log.error("training failed at step %d:\n%s", session.step, traceback.format_exc())
        saved = session.emergency_save()
        note = f"; emergency checkpoint at step {saved.step}" if saved else ""
        outcome = Outcome(Status.FAILED, session.step, ExitCode.FAILED, f"{type(e).__name__}: {e}{note}")
    finally:
        session.close()
    outcome.run_dir = str(session.run_dir)
    if policy is not None:
        outcome = policy.classify(outcome)
    preemption.latest_outcome = outcome
    if not logs:
        return outcome
    append_event(
        session.run_dir,
        "stop",
        reason=outcome.status.value,
        exit_code=int(outcome.exit_code),
        resumed_from=session.resumed_from,
        step=outcome.step,
        checkpoint_step=session.last_checkpoint.step if session.last_checkpoint else None,
        signal_to_saved_s=session.signal_to_saved_s,
        message=outcome.message,
    )
    return outcome
