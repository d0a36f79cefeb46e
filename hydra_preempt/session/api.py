"""The session: the only thing a training function talks to.

    def train(session):
        model, optimizer, loader = ..., ..., DataLoader(dataset, shuffle=True, num_workers=2)
        session.register(model=model, optimizer=optimizer, data=loader)
        session.restore()                            # the newest good checkpoint, if any
        for epoch in session.epochs(num_epochs):     # from the epoch the checkpoint was in
            for batch in session.batches(loader):    # a step per batch; stops at a boundary on a signal
                ...
                session.report(loss=loss.item())
        return {...}

    outcome = hydra_preempt.run(train, run_dir, config)   # Outcome(status, step, exit_code, ...)

Work happens only at step boundaries, where the state is consistent: finish
the step -> judge divergence -> decide (session/boundary.py) -> save if the
decision says so -> stop if it says so.

Multi-rank (torch.distributed initialised before run()): every
`distributed.sync_every` steps the ranks agree (one all-reduce of a few
flags) on stopping, saving and divergence, so all stop at the same step.
Rank 0 writes one checkpoint holding the shared objects (registered with
`register`, e.g. a DDP model and its optimizer) and every rank's own state
(`register_per_rank`, e.g. its data shard position, and its RNGs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, NoReturn

import torch

from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.layout import CorruptCheckpointError
from ..checkpoint.retention import RetentionPolicy
from ..checkpoint.store import CheckpointInfo, CheckpointStore
from ..config import SessionConfig
from ..distributed import (
    agree,
    broadcast_from_rank0,
    check_same_directories,
    check_shared_directories,
    gather_to_rank0,
    world,
)
from ..errors import CheckpointReadError, ConfigError, HydraPreemptError, RunDirWriteError
from ..gpumetrics import GPU_METRICS_FILE, GpuSampler
from ..outcome import Status
from ..rundir import (
    RESULT_FILE,
    MetricsLog,
    RunHistory,
    RunLock,
    create_run_dir,
    remove_stale_temporaries,
    run_id,
    write_result,
)
from ..slurm.env import SrunStep
from . import boundary
from .divergence import HealthRule, LossSpikeDetector, Verdict
from .progress import Progress
from .signals import Request, SignalRequests
from .state import StateRegistry, StepStart, check_tree
from .watchdog import MAX_POLL_S, Watchdog

log = logging.getLogger("hydra_preempt")

_NON_FINITE_ELSEWHERE = "a watched metric not finite on another rank"


class RunStopped(BaseException):
    """Raised out of `Session.steps()` at a step boundary to end the training function.

    A BaseException, so that a training loop's `except Exception` does not swallow it.
    """

    def __init__(
        self, status: Status, message: str, signal: str | None = None, signal_time: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.signal = signal
        self.signal_time = signal_time


class Session:
    """`seconds_left`, when given, tells how long until the process will be killed (grace end or time
    limit); a stop then skips a save that could not finish in time, if a checkpoint already exists.
    `signals`: the stop-signal handlers, when run() installed them before the session existed."""

    def __init__(
        self,
        run_dir: Path | str,
        config: SessionConfig | None = None,
        seconds_left: Callable[[], float | None] | None = None,
        signals: SignalRequests | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.seconds_left = seconds_left
        self._stop_allowance_s: float | None = None  # the watchdog's, once a stop signal came
        self._stop_begun = False  # the training thread took a stop at a boundary (or during start-up)
        self.config = config or SessionConfig()
        c = self.config.checkpoint
        directory = Path(c.dir) if Path(c.dir).is_absolute() else self.run_dir / c.dir
        self._rank, self._world_size = world()  # torch.distributed is set up before a session starts
        g = self.config.gpu_metrics
        # Rank 0 samples the GPUs its node shows it (other nodes' GPUs are not in the file); rank 0
        # writes each checkpoint's manifest, with a summary of these samples in it
        self._gpu_sampler = (
            GpuSampler(self.run_dir / GPU_METRICS_FILE, g.every_s) if g.enabled and self._rank == 0 else None
        )
        store = CheckpointStore(
            directory,
            RetentionPolicy.from_config(c),
            self._gpu_sampler.summary if self._gpu_sampler is not None else None,
        )
        self.checkpointer = Checkpointer(store, c)
        d = self.config.divergence
        self.detector = LossSpikeDetector.from_config(d) if d.enabled else None
        self.signals = signals or SignalRequests(self.config.signals.preempt, self.config.signals.timeout)
        w = self.config.watchdog
        self.watchdog = Watchdog(w.timeout_s, w.min_timeout_s, w.startup_s, w.enabled)  # started by run()
        self.state = StateRegistry()
        self.state.before_update = _update_waits_for_copies(self.checkpointer, self.watchdog)
        self.step = 0  # completed steps
        self.resumed_from: int | None = None
        self.metrics: dict[str, float] = {}  # latest value of every reported metric
        self.signal_to_saved_s: float | None = None
        self.result_error: str | None = None  # why result.json could not be written
        self._lock = RunLock(self.run_dir)
        self._metrics_log = MetricsLog(self.run_dir)
        self.run_id = ""  # the run's stable id (rundir.run_id), known once prepare() ran
        self._restored = False
        self._loading = False  # set while restore() sets the objects
        self._step_metrics: dict[str, float] = {}
        self._last_step_metrics: dict[str, float] = {}
        self._non_finite_since: int | None = None  # first step of the current run of nan/inf watched metrics
        watched = (self.config.divergence.metric, self.config.checkpoint.metric)
        self._watched = tuple(sorted({m for m in watched if m}))  # a nan/inf value of these is never saved
        self._open_step: StepStart | None = None  # set while a step runs
        self._left_step: StepStart | None = None  # the step the loop was left in (break, return, exception)
        self._planned_epochs: tuple[int, int] | None = None  # (first, count) of epochs(), for the progress total
        self._epoch_passes: list[Any] | None = None  # inside epochs(): the loaders this epoch passed over
        self._epoch: int | None = None  # inside epochs(): the epoch in progress
        self._epoch_position: Any = None  # inside epochs(): the position of the loader that counts them
        self._left_pass: Any = None  # a position whose batches() loop was left before its pass ended
        self._left_epochs: Any = None  # the counting position of an epochs() loop left before its last epoch
        self._pass: Any = None  # the position batches() iterates last (batch_index)
        self._steps_done: Callable[[], int] | None = None  # inside driven_steps(): the steps its loop completed
        self.result_written = False  # write_result() wrote result.json: run() leaves it as it is
        # True while the item just handed out by steps()/batches() is the last of its step: the moment
        # for optimizer.step() under gradient accumulation (batches(loader, every=K))
        self.update_due = True
        # One progress line per run, not per rank: rank 0's
        self._progress = Progress(self.config.progress.every_s, sys.stderr) if self._rank == 0 else None

    @property
    def last_checkpoint(self) -> CheckpointInfo | None:
        return self.checkpointer.last

    @property
    def last_save_s(self) -> float | None:
        return self.checkpointer.last_save_s

    # -- life cycle (driven by run()) -------------------------------------
    def open(self) -> None:
        """Create the run directory, install the signal handlers (then: wait_for_run_lock, prepare)."""
        create_run_dir(self.run_dir)
        self.signals.install()

    def prepare(self) -> None:
        """Under the run lock: clean what interrupted writes left, learn the run id, claim and check the
        checkpoint directory (a collective). Nothing in either directory is touched before the lock."""
        directories = [self.run_dir, self.checkpointer.store.directory]
        check_same_directories(directories)
        self.checkpointer.prepare(self._claim_run_dir)  # calls it on rank 0
        check_shared_directories(directories)
        self.run_id = broadcast_from_rank0(self.run_id)
        if self._gpu_sampler is not None:
            self._gpu_sampler.start()

    def _claim_run_dir(self) -> dict[str, str]:
        """Rank 0: clean the run directory, learn (or make) the run id; the owner mark of the checkpoint directory."""
        for name in remove_stale_temporaries(self.run_dir):
            log.info("removed %s left by an interrupted write", name)
        self.run_id = run_id(self.run_dir)
        return {"run_id": self.run_id, "run_dir": str(self.run_dir.absolute())}

    def close(self, finished: bool = False) -> None:
        """`finished`: the run's outcome is decided, so stop signals are held (dropped) instead of
        restored: the caller uninstalls them unless the process ends next (see run())."""
        self.watchdog.close()
        self.checkpointer.join(self._time_to_kill_s())  # a save still being written ends before the process does
        self.state.release()
        if self._gpu_sampler is not None:
            self._gpu_sampler.stop()
        if finished:
            self.signals.hold()
        else:
            self.signals.uninstall()
        self._metrics_log.close()
        self._lock.release()

    def stop_if_requested(self) -> None:
        """Before training: a stop signal that came during start-up (any rank's: a collective) stops the
        run here, with nothing to save yet (RunStopped)."""
        pending = self.signals.peek()
        stop = boundary.stop_status(*map(bool, agree([Request.PREEMPT in pending, Request.CANCEL in pending])))
        if stop is None:
            return
        self._stop_begun = True
        request = Request.CANCEL if stop is Status.CANCELLED else Request.PREEMPT
        signum = self.signals.take().get(request)
        name = signum.name if signum else "a signal to another rank"
        latest = self.checkpointer.store.latest()
        where = f"the checkpoint of step {latest.step} stands" if latest else "no checkpoint yet"
        raise RunStopped(
            stop,
            f"{name} received during start-up: nothing saved, {where}",
            name,
            self.signals.first_received.get(request),
        )

    def stop_allowance_s(self) -> float | None:
        """For the watchdog thread: the seconds the run has, from now, to end by itself after a stop
        signal reached the process (its handler may not have run), before the watchdog ends it with
        nothing saved (boundary.stop_allowance). None: no stop to watch: no signal; the training thread
        took the stop at a boundary (its own deadlines govern, and a save may be under way); or a Ctrl-C
        (SIGINT) with no kill coming, which waits for the boundary as long as it takes (an interactive
        run, a notebook's interrupt)."""
        arrived = self.signals.arrived()
        if arrived is None or self._stop_begun:
            self._stop_allowance_s = None
            return None
        if self._stop_allowance_s is None:
            left = self.seconds_left() if self.seconds_left else None
            if left is None and arrived[0] is Request.CANCEL:
                return None
            allowance = boundary.stop_allowance(left, self.config.signals.grace_s, MAX_POLL_S)
            if left is None and self.seconds_left is not None:
                return allowance  # SLURM did not tell the kill this time: asked again at the next look
            self._stop_allowance_s = allowance  # asked once: under SLURM each ask is an scontrol call
        return self._stop_allowance_s

    def wait_for_run_lock(self, lone_task: SrunStep | None = None, poll_s: float = 2.0) -> None:
        """One live run per run directory: wait while another process holds it (rank 0 holds it for all).

        A stop signal while waiting raises RunStopped without touching the run. `lone_task`: the srun
        step this process is one task of, without a process group (distributed.srun false); a task of
        the same step holding the lock means the step's tasks share this run directory: ConfigError."""
        if world()[0] != 0:
            return
        step = f" step {lone_task.job_id}.{lone_task.step_id}" if lone_task else ""

        def stop_requested() -> bool:
            return bool(self.signals.peek() & {Request.CANCEL, Request.PREEMPT})

        def announce(holder: str) -> None:
            if lone_task is not None and holder.endswith(step):
                raise ConfigError(
                    f"the {lone_task.world_size} tasks of srun{step} share run directory {self.run_dir} and "
                    "distributed.srun is false: each would be an independent copy of the run; give each task its "
                    "own run directory, or let them be one process group (distributed.srun: true)"
                )
            log.warning("run directory %s is in use by %s: waiting for it to end", self.run_dir, holder)

        if not self._lock.acquire(stop_requested, announce, poll_s, identity=step):
            status = Status.CANCELLED if Request.CANCEL in self.signals.peek() else Status.PREEMPTED
            raise RunStopped(status, f"stopped while waiting for {self._lock.path}; the run is another process's")

    # -- the training function's API ----------------------------------------
    def register(self, **objects: Any) -> None:
        """Objects whose state is saved and restored together (model, optimizer, scheduler, scaler, data, ...)."""
        self._check_not_restored()
        self.state.register(False, **objects)

    def register_per_rank(self, **objects: Any) -> None:
        """Objects whose state differs between ranks (a data shard's position, ...): each rank's is saved."""
        self._check_not_restored()
        self.state.register(True, **objects)

    def _check_not_restored(self) -> None:
        if self._restored:
            raise ConfigError("register() every object before restore() or steps(): later ones would not be restored")

    def restore(self) -> int:
        """Load the newest good checkpoint into the registered objects; return the step to continue from."""
        if self._restored:
            return self.step
        loaded = self.checkpointer.load_latest(self._check_tree)
        if loaded is None:
            log.info("no checkpoint in %s: starting at step 0", self.checkpointer.store.directory)
            self._restored = True
            self._rewind_metrics(0)
            return 0
        info, tree, metadata = loaded
        rank, size = world()
        where = str(info.path)
        cast = self.config.checkpoint.cast_dtype
        self.state.check(tree, info.sharded, rank, size, where, cast)  # every check before anything is loaded
        shards: dict[str, Any] = {}
        if metadata is not None:
            shards = self.state.sharded_template(info.sharded)
            self.state.check_shards(shards, metadata, where, cast)
            try:
                self.checkpointer.load_shards(info, metadata, shards)
            except CorruptCheckpointError as e:
                raise CheckpointReadError(f"{e}; nothing was loaded") from None
        self._loading = True  # until every object is set: no checkpoint may be written from a half-loaded state
        self.state.load(tree, shards, rank, size, where)
        if self.detector is not None and tree["session"].get("detector"):
            self.detector.load_state_dict(tree["session"]["detector"])
        self._loading = False
        self._restored = True
        self.step = self.resumed_from = int(tree["session"]["step"])
        log.info("resumed from %s (step %d, saved on %s)", info.path.name, self.step, info.reason)
        self._rewind_metrics(self.step)
        if not self.state.holds_data_position():
            log.warning(
                "resumed at step %d with no data position registered: if batches come from a DataLoader, "
                "session.register(data=loader) and iterate session.batches(loader), or this run sees other data "
                "than an uninterrupted one (register the object that holds your position as `data`)",
                self.step,
            )
        return self.step

    def _rewind_metrics(self, step: int) -> None:
        """RUN_DIR/metrics.jsonl up to the step this start continues from: the steps after it are made again."""
        if self._rank == 0:
            self._metrics_log.rewind(step)

    def _check_tree(self, tree: Any, info: CheckpointInfo) -> None:
        """Raises ValueError for a state tree this library could not have written (see state.check_tree)."""
        check_tree(
            tree,
            info.step,
            LossSpikeDetector.from_config(self.config.divergence) if self.detector is not None else None,
        )

    def steps(self, max_steps: int) -> Iterator[int]:
        """Yield the index of each step to run, from the restored step up to `max_steps`.

        Leaving the loop early (`break`, `return`) is safe: a step whose update ran counts as done."""
        self._check_no_open_step("steps()")
        self.restore()

        def next_step() -> int:
            if self.step >= max_steps:
                raise StopIteration
            return self.step

        self._end_left_pass()
        return self._stepping(next_step, 1, max_steps)

    def driven_steps(self, done: Callable[[], int], total: int = 0) -> Generator[int, None, None]:
        """Step boundaries for a loop that is not the session's (a Lightning Trainer's): the first next()
        begins a step, each later one ends the steps made since (`done()`: how many the loop completed
        in all; its boundary: divergence, saves, the stop, RunStopped) and begins the next, yielding its
        index; `total`, the steps the run will make, for the progress line (0: unknown). close() leaves
        the step begun last as batches() does."""
        self._check_no_open_step("driven_steps()")
        self.restore()
        self._end_left_pass()
        return self._stepping(lambda: self.step, 1, total, done=done)

    def batches(self, loader: Any, every: int = 1) -> Iterator[Any]:
        """One pass over `loader` (an epoch), with a step boundary after every `every` batches (the
        optimizer steps of gradient accumulation) and after the pass's last batch.

        Register the loader first (`session.register(data=loader)`): then, after `restore()`, the
        pass in progress at the checkpoint continues at its exact next batch (loader_position.py).
        Leaving the loop early (`break`, `return`) is safe: a step whose update ran counts as done."""
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ConfigError(f"batches(every=...) must be a positive integer, got {every!r}")
        self._check_no_open_step("batches()")
        self.restore()
        position = self.state.position_of(loader)
        if position is not None and self._epoch_passes is not None:
            if position in self._epoch_passes:
                raise ConfigError(
                    "batches(): a second pass over the same DataLoader in one epoch of epochs(); epochs() counts "
                    "the loader's passes, so give each epoch one pass (or loop with steps())"
                )
            self._epoch_passes.append(position)
        if position is None:
            log.warning(
                "session.batches(): this %s is not registered, so a resumed run does not continue at its next "
                "batch; session.register(data=loader) before restore()",
                type(loader).__name__,
            )
            batches = iter(loader)
        else:
            self._end_left_pass()
            batches = position.iterate(self._epoch)
        total = 0  # unknown: the progress line shows the step alone
        if self._planned_epochs is not None and position is not None and position.batches_per_pass() > 0:
            per_pass, done = -(-position.batches_per_pass() // every), -(-position.yielded // every)
            total = self.step + per_pass * (self._planned_epochs[1] - position.epoch) - done
        ends_pass = (lambda: position.yielded == position.batches_per_pass()) if position is not None else None
        self._pass = position
        return self._stepping(lambda: next(batches), every, total, ends_pass, position)

    @property
    def batch_index(self) -> int | None:
        """The index, within its epoch, of the batch batches() handed out last (a registered loader):
        use it where enumerate() would restart at 0 after a mid-epoch resume."""
        return self._pass.yielded - 1 if self._pass is not None and self._pass.yielded else None

    def epochs(self, count: int, loader: Any = None) -> Iterator[int]:
        """The epochs left of `count`: from the one the registered loader's position is in (0 on a
        fresh run). For `for epoch in session.epochs(E): for batch in session.batches(loader):`.
        `loader`: which registered DataLoader counts the epochs, when more than one is registered."""
        self.restore()
        positions = self.state.positions() if loader is None else [p for p in [self.state.position_of(loader)] if p]
        if len(positions) != 1:
            raise ConfigError(
                "epochs() counts the passes of a registered DataLoader: register one (session.register(data=loader))"
                if not positions or loader is not None
                else "epochs(): more than one DataLoader is registered; name the one that counts: epochs(n, loader=...)"
            )
        # the epoch in progress at a step boundary's checkpoint (its position holds it): a resume at its last
        # step runs the code after its batches() loops, a per-epoch scheduler step; else the loader's passes
        counting = positions[0]
        first = counting.epoch_in_progress if counting.epoch_in_progress is not None else counting.epoch
        self._planned_epochs = (first, count)
        return self._epochs(first, count, counting)

    def _epochs(self, first: int, count: int, counting: Any) -> Iterator[int]:
        try:
            for epoch in range(first, count):
                self._end_left_pass()  # a pass left early is over: the next epoch starts the next pass
                self._epoch_passes, self._epoch, self._epoch_position = [], epoch, counting
                counting.epoch_in_progress = epoch
                yield epoch
            counting.epoch_in_progress = None
        except GeneratorExit:  # left by break, or by an exception: an emergency save keeps the epoch
            self._left_epochs = counting  # any other save ends it (_end_left_pass)
            raise
        finally:
            self._epoch_passes = self._epoch = self._epoch_position = None

    @contextlib.contextmanager
    def _epoch_done(self) -> Iterator[None]:
        """A save outside the step boundaries (session.save() after the batches() loops, the final one)
        holds the epoch in progress as done: a resume starts the next one, and what the epoch's body did
        before the save (its scheduler step) is not done twice. Only a step boundary's checkpoint lands a
        resume inside its epoch."""
        counting = self._epoch_position
        if counting is None:
            yield
            return
        kept, counting.epoch_in_progress = counting.epoch_in_progress, None
        try:
            yield
        finally:
            counting.epoch_in_progress = kept

    def _end_left_pass(self) -> None:
        """A batches() loop left before its pass ended (break, return) ended that pass, and an epochs()
        loop left so ended its epoch: a save from here on (session.save() after the loop, another
        loop's boundary, the final one) holds them ended, so that a resume does not go on with what the
        run never trained. Not applied by an emergency save: an exception cut them short, and a resume
        continues them."""
        if self._left_pass is not None:
            self._left_pass.end_pass()
            self._left_pass = None
        if self._left_epochs is not None:
            self._left_epochs.epoch_in_progress, self._left_epochs = None, None

    def _check_no_open_step(self, what: str) -> None:
        if self._open_step is not None:
            raise ConfigError(
                f"{what} inside a step of another loop would make each of its items a training step; "
                "iterate a validation loader with a plain for loop"
            )

    @contextlib.contextmanager
    def long_phase(self, name: str, allowed_s: float | None = None) -> Iterator[None]:
        """Announce a long phase inside the training loop (an evaluation, a data set rebuilt) to the
        hang watchdog: while it lasts, it may take `allowed_s` seconds (default: watchdog.startup_s)
        instead of a step's allowance. Stop requests wait for the next step boundary, as ever.

            with session.long_phase("evaluation", allowed_s=3600):
                evaluate(model)
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"long_phase(): name must be a non-empty string, got {name!r}")
        if allowed_s is not None and not (
            isinstance(allowed_s, (int, float)) and not isinstance(allowed_s, bool) and 0 < allowed_s < math.inf
        ):
            raise ConfigError(
                f"long_phase({name!r}): allowed_s must be a positive number of seconds, got {allowed_s!r}"
            )
        with self.watchdog.phase(name, allowed_s):
            yield

    def _stepping(
        self,
        next_item: Callable[[], Any],
        per_step: int,
        total: int,
        ends_pass: Callable[[], bool] | None = None,
        position: Any = None,
        done: Callable[[], int] | None = None,
    ) -> Generator[Any, None, None]:
        """Steps of `per_step` items each, until next_item() raises StopIteration; a step also ends
        with the item after which `ends_pass()` is true (the last batch of an epoch). `position`: the
        registered loader's whose pass this is (a loop left before it ends ends the pass). `done`: the
        steps completed in all, where the loop counts them (driven_steps)."""
        progress = self._progress
        if progress is not None:
            progress.start(self.step)
        self._steps_done = done
        try:
            while True:
                self._start_step()  # before the item is taken: an emergency checkpoint's state precedes it
                given = 0
                while not (given and self.update_due):
                    try:
                        item = next_item()
                    except StopIteration:
                        break
                    given += 1
                    self.update_due = given == per_step or (ends_pass is not None and ends_pass())
                    try:
                        yield item
                    except GeneratorExit:  # the loop was left: break, return, an exception
                        if done is None:
                            self._leave_step()
                        else:  # the loop that counts its steps says how many it completed
                            self._open_step, self.step = None, max(self.step, done())
                        raise
                if not given:
                    self._open_step = None
                    return
                self._end_step(done() if done is not None else None)
                if progress is not None:
                    last = self.last_checkpoint
                    progress.update(self.step, total, *((last.step, last.created) if last else (None, None)))
        finally:  # ended, stopped or raised: the watchdog no longer waits for steps
            self._steps_done = None
            self.watchdog.stop_watching()
            if progress is not None:
                progress.close()
            if position is not None and not position.exhausted:
                self._left_pass = position

    def _leave_step(self) -> None:
        """The loop was left inside a step (break, return, an exception), so that the step a checkpoint
        is labelled with and the state it holds agree:
        - if the step's update ran (an optimizer step, a buffer or a parameter changed: the fingerprint
          moved), the step counts as done, without its boundary's work (saves, stop requests, the
          ranks' agreement: the loop is gone); an exception undoes that (emergency_save);
        - if nothing changed, the step is not counted (an exception then saves the state it started
          from: emergency_save); unless an object too large to copy at each step start was not
          (StateRegistry.step_start): its state there is unknown, so the step counts as done.
        A later save (session.save() after a `break`, the final one) holds the state as it is then,
        the pass of the loop left ended (_end_left_pass), as the run goes on from it."""
        start, self._open_step = self._open_step, None
        self._left_step = start
        if start is None or self.state.can_return_to(start):
            return
        self.watchdog.beat()
        self.step += 1
        self._last_step_metrics, self._step_metrics = self._step_metrics, {}

    def report(self, **metrics: Any) -> None:
        """Record metrics of the current step (floats, or 0-d tensors)."""
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        self._step_metrics.update(values)
        self.metrics.update(values)
        if self._rank == 0:
            step = self._steps_done() if self._steps_done is not None else self.step + (1 if self._open_step else 0)
            self._metrics_log.append({"step": step, **values})

    def save(self, reason: str = "manual") -> CheckpointInfo | None:
        """Save now; only valid between steps (before the loop, after it, or from a callback at a boundary).
        None, with a warning, while a watched metric is not finite (such a state is never saved)."""
        if self._open_step is not None:
            raise ConfigError(
                "save() inside a step would save a half-updated state; it runs at the step boundary by itself"
            )
        bad = self._non_finite_on_any_rank()
        if bad is not None:
            log.warning("save() at step %d skipped: %s; a non-finite state is never saved", self.step, bad)
            return None
        self._end_left_pass()
        with self._epoch_done():
            saved = self._save(reason, self._last_step_metrics)
        self._left_step = None  # a loop left before this save was left on purpose: an exception later is no part of it
        return saved

    def save_final(self) -> CheckpointInfo | None:
        """The checkpoint of a finished run (nothing is written if this state is on disk already).

        A run that ends with a non-finite watched metric stops as diverged instead (RunStopped)."""
        bad = self._non_finite_on_any_rank()
        if bad is not None:
            self._stop_diverged(f"training ended with {bad} at step {self.step}")
        self._end_left_pass()
        with self._epoch_done():
            return self._save("final", self._last_step_metrics)

    def write_result(self, result: dict[str, Any]) -> Path:
        """Write result.json atomically (rank 0 only). If it cannot be written (disk full) training is
        not interrupted: the final checkpoint is still saved and run() ends FAILED, so that a restart,
        which resumes at the last step, writes it again."""
        self.result_written = True
        if world()[0] == 0:
            try:
                return write_result(self.run_dir, result)
            except RunDirWriteError as e:
                log.error("%s", e)
                self.result_error = str(e)
        return self.run_dir / RESULT_FILE

    @property
    def restarts(self) -> int:
        """How many times this run was started before the current start."""
        return RunHistory.read(self.run_dir).restarts

    # -- step boundaries ------------------------------------------------------
    def _start_step(self) -> None:
        self._left_step = None
        if self.config.checkpoint.emergency and self._world_size == 1:
            self._open_step = self.state.step_start(self.step)
        else:  # multi-rank runs write no emergency checkpoint: only whether a step changed the state
            self._open_step = StepStart(self.step, self.state.fingerprint(), {}, {})

    def _end_step(self, done: int | None = None) -> None:
        """The boundary after the step in progress; `done`: the steps completed by now, where the loop
        that is not the session's made several since its last boundary (driven_steps)."""
        self.watchdog.beat()
        self._open_step = None
        before, self.step = self.step, self.step + 1 if done is None else max(done, self.step + 1)
        metrics, self._step_metrics = self._step_metrics, {}
        self._last_step_metrics = metrics
        verdict = self._judge(metrics)
        non_finite = self._non_finite()
        if non_finite is None:
            self._non_finite_since = None
        elif self._non_finite_since is None:
            self._non_finite_since = self.step
        periodic = False
        for step in range(before + 1, self.step + 1):  # each step's periodic save, due or not, is noted
            periodic = self.checkpointer.periodic_due(step)
        if not boundary.agrees_at(self.step, world()[1], self.config.distributed.sync_every):
            return  # requests stay pending until the ranks next agree
        for signum in self.signals.retake():
            log.warning(
                "the program replaced the %s handler after run() started (signal.signal, asyncio's "
                "add_signal_handler): taken back, so that a stop still saves and requeues; stop signals are "
                "the session's while run() lasts (see docs/signals-and-exit-codes.md)",
                signum.name,
            )
        requests = self.signals.take()
        agreed = agree(
            [
                Request.PREEMPT in requests,
                Request.CANCEL in requests,
                Request.CHECKPOINT in requests,
                periodic,
                verdict is Verdict.SUSPECT,
                verdict is Verdict.DIVERGED,
                non_finite is not None,
                *self.checkpointer.background_flags(),
            ]
        )
        self.checkpointer.settle(*map(bool, agreed[7:]))  # a background write's failure surfaces here
        flags = boundary.BoundaryFlags(*map(bool, agreed[:7]))
        miss = bool(flags.stopping and agree([self._save_would_miss_deadline()])[0])
        action = boundary.decide(flags, miss)
        if action.stop is Status.DIVERGED:
            if flags.diverged:
                why = (
                    self.detector.diverged_reason
                    if self.detector and self.detector.diverged_reason
                    else "the loss diverged on another rank"
                )
            else:
                stop_request = requests.get(Request.CANCEL) or requests.get(Request.PREEMPT)
                why = (
                    f"{stop_request.name if stop_request else 'a stop signal to another rank'} received with "
                    f"{non_finite or _NON_FINITE_ELSEWHERE} at step {self.step}: a non-finite state is not saved"
                )
            self._stop_diverged(why)
        if action.unsaved_non_finite:
            log.warning(
                "%s at step %d: not saving this state; a due periodic checkpoint waits for finite values",
                non_finite or _NON_FINITE_ELSEWHERE,
                self.step,
            )
        elif action.deferred:
            log.warning("step %d: loss spike, deferring the periodic checkpoint until the loss recovers", self.step)
        stop: Status | None = action.stop
        self._stop_begun = stop is not None  # from here the session's own deadlines govern the stop
        stalled = False  # a stop save waits for the write in flight, only as long as it can itself still fit
        if action.save and stop is not None:
            with self.watchdog.slow_work():
                stalled = not self.checkpointer.wait(self._wait_before_stop_save_s())
            if stalled:
                log.error("not saving at step %d: %s", self.step, self.checkpointer.store.intact_note())
        if action.save and not stalled:
            if action.save == "periodic" and self.config.checkpoint.async_save:
                self._save_in_background(metrics)  # staged at this boundary, written by a thread
            else:
                self._save(action.save, metrics)
            late = self.signals.take()  # requests that came during the save (or its staging) are covered by it
            late_flags = agree([Request.PREEMPT in late, Request.CANCEL in late])
            stop = (
                boundary.stop_status(flags.preempt or bool(late_flags[0]), flags.cancel or bool(late_flags[1])) or stop
            )
            requests = {**late, **requests}
        if stop is not None:
            self._stop_begun = True
            with self.watchdog.slow_work():
                self.checkpointer.wait(self._time_to_kill_s())  # a stop takes what is being written with it
            request = Request.CANCEL if stop is Status.CANCELLED else Request.PREEMPT
            self._note_signal_latency(request)
            name = requests[request].name if request in requests else "a signal to another rank"
            saved = self.last_checkpoint.step if self.last_checkpoint else None
            state = (
                f"state saved at step {self.step}" if saved == self.step else f"the checkpoint of step {saved} stands"
            )
            raise RunStopped(stop, f"{name} received: {state}", name, self.signals.first_received.get(request))

    def _non_finite(self) -> str | None:
        """'loss=nan' when the latest value of a watched metric (divergence.metric, checkpoint.metric)
        is not finite: such a state is never saved."""
        bad = [f"{k}={v}" for k in self._watched if not math.isfinite(v := self.metrics.get(k, 0.0))]
        return ", ".join(bad) or None

    def _non_finite_on_any_rank(self) -> str | None:
        """`_non_finite()`, agreed over the ranks (a collective): every rank skips the same save."""
        bad = self._non_finite()
        return bad or (_NON_FINITE_ELSEWHERE if agree([bad is not None])[0] else None)

    def _stop_diverged(self, why: str) -> NoReturn:
        """Stop as diverged without saving this state; the checkpoints newer than the last healthy one
        (divergence.HealthRule) are set aside, so that a restart resumes from a healthy state."""
        metric = self.config.divergence.metric
        since = self._non_finite_since
        rule = self.detector.health_rule(since) if self.detector else HealthRule(since)
        resume = self.checkpointer.set_aside(
            lambda infos: rule.suspect_tail(infos, metric),
            f"newer than the last healthy checkpoint of a run that diverged at step {self.step}",
        )
        where = (
            f"a restart resumes from step {resume}" if resume else "a restart starts at step 0 (no healthy checkpoint)"
        )
        log.error("%s; this state is not saved, %s", why, where)
        raise RunStopped(Status.DIVERGED, f"{why}; {where}")

    def _judge(self, metrics: dict[str, float]) -> Verdict:
        if self.detector is None or self.config.divergence.metric not in metrics:
            return Verdict.OK
        return self.detector.update(metrics[self.config.divergence.metric], self.step)

    def _save_would_miss_deadline(self) -> bool:
        left = self.seconds_left() if self.seconds_left is not None and self.last_checkpoint is not None else None
        last_save_s = self.checkpointer.last_save_s
        if last_save_s is not None:  # a save now waits for the one in flight first
            last_save_s += self.checkpointer.in_flight_s()
        if not boundary.save_would_miss_deadline(left, last_save_s, self.last_checkpoint is not None):
            return False
        assert left is not None and last_save_s is not None and self.last_checkpoint is not None
        log.warning(
            "not saving at step %d: a save takes about %.1f s and only %.1f s are left before the kill; "
            "the checkpoint of step %d stands",
            self.step,
            boundary.save_estimate_s(last_save_s),
            left,
            self.last_checkpoint.step,
        )
        return True

    def _time_to_kill_s(self) -> float | None:
        """How long a stopping process may wait for a write in flight: until shortly before the kill
        (None: no kill is known, wait as long as it takes)."""
        left = self.seconds_left() if self.seconds_left is not None else None
        return None if left is None else left - boundary.DEADLINE_MARGIN_S

    def _wait_before_stop_save_s(self) -> float | None:
        """How long a stop save may wait for the write in flight and still have time for itself."""
        left = self._time_to_kill_s()
        last_save_s = self.checkpointer.last_save_s
        return None if left is None else left - boundary.save_estimate_s(last_save_s or 0.0)

    def _note_signal_latency(self, request: Request) -> None:
        received = self.signals.first_received.get(request)
        if received is not None and self.checkpointer.saved_at >= received:
            self.signal_to_saved_s = self.checkpointer.saved_at - received

    # -- saving ---------------------------------------------------------------
    def _detector_state(self) -> dict | None:
        return self.detector.state_dict() if self.detector else None

    def _save(self, reason: str, metrics: dict[str, float]) -> CheckpointInfo:
        """Save the current state: a collective on multi-rank runs (every rank's own part goes to rank 0)."""
        if self.last_checkpoint is not None and self.last_checkpoint.step == self.step:
            return self.last_checkpoint  # this state is on disk already
        with self.watchdog.slow_work():
            return self.checkpointer.save(self.step, reason, metrics, self._tree(), self._shards())

    def _save_in_background(self, metrics: dict[str, float]) -> None:
        if self.last_checkpoint is not None and self.last_checkpoint.step == self.step:
            return
        with self.watchdog.slow_work():  # waits for the save in flight, then stages this one
            self.checkpointer.save_in_background(
                self.step,
                "periodic",
                metrics,
                self._tree(),
                self._shards(),
                self.state.changed_only_by_optimizer_steps(),
            )

    def _tree(self) -> dict[str, Any] | None:
        """The state tree of this step on rank 0 (None elsewhere): a collective, every rank's own part goes to rank 0."""
        if self._loading:
            raise CheckpointReadError(
                "restoring the checkpoint failed part way: no checkpoint is written from this state"
            )
        ranks = gather_to_rank0(self.state.rank_state())
        return self.state.tree(self.step, ranks, self._detector_state()) if ranks is not None else None

    def _shards(self) -> dict[str, Any] | None:
        return self.state.sharded_state() if self.state.sharded else None

    def emergency_save(self) -> tuple[CheckpointInfo | None, str]:
        """After an unhandled exception: save if the state is consistent. Returns the checkpoint, and
        why none was written ("" when saved, or when emergency saves are off or nothing was restored)."""
        start = self._open_step or self._left_step
        if start is not None and self.step > start.step:  # the loop was left by this exception, after the update
            self.step = start.step  # a step an exception cut short is not done
        if not self.config.checkpoint.emergency or not self._restored:
            return None, ""
        bad = self._non_finite()
        if bad is not None:
            return None, f"{bad}; a non-finite state is never saved"
        if world()[1] > 1:
            return None, "a multi-rank run's other ranks cannot be reached safely from an exception"
        if start is not None and not self.state.unchanged_since(start):
            return None, (
                f"the exception came after step {start.step + 1} had changed the model or optimizer; "
                f"{self._last_checkpoint_stands()}"
            )
        if start is not None and start.uncopied:
            return None, (
                f"{', '.join(map(repr, start.uncopied))} too large to copy at each step start: "
                f"its state when step {start.step + 1} began is unknown; {self._last_checkpoint_stands()}"
            )
        try:
            if start is None:
                tree = self.state.tree(self.step, [self.state.rank_state()], self._detector_state())
            else:  # nothing was updated yet: the state is the one the step started from
                tree = self.state.tree_at(start, self._detector_state())
        except Exception as e:  # an object's state_dict() raised (a StopIteration too): never out of here
            return None, f"reading the registered objects' state failed ({type(e).__name__}: {e})"[:400]
        step = tree["session"]["step"]
        if self.last_checkpoint is not None and self.last_checkpoint.step == step:
            return self.last_checkpoint, ""  # this step is on disk already (a save after a loop left early)
        try:
            return self.checkpointer.save(step, "emergency", {}, tree, self._shards()), ""
        except HydraPreemptError as e:
            return None, f"it failed: {e}"
        except Exception as e:  # an object's state that cannot be written: the run's own error stands
            return None, f"it failed: {type(e).__name__}: {e}"[:400]

    def _last_checkpoint_stands(self) -> str:
        return f"the last checkpoint (step {self.last_checkpoint.step if self.last_checkpoint else 'none'}) stands"

    def stop_behind(self, error: BaseException) -> RunStopped | None:
        """An exception out of the training function after a stop signal reached this process is that
        stop, not a failure: a child process of the program (a pool's worker, a subprocess, a DataLoader
        worker of a spawn context) died of the same signal from the scheduler, and the program raised
        for it; or the exception cut the stop's own save short. The newest consistent state is saved
        (emergency_save: the state the step started from, or the state of the boundary), else the last
        checkpoint stands, named with the steps lost. A checkpoint request (SIGUSR1) that a child died of
        stops the run the same way, as a preemption: training cannot go on past the exception, and a
        requeue continues it. None: no such signal came."""
        received = self.signals.first_signal
        request = next((r for r in (Request.CANCEL, Request.PREEMPT, Request.CHECKPOINT) if r in received), None)
        if request is None:
            return None
        self._stop_begun = True
        self.signals.take()
        name = received[request].name
        saved, why_not = self.emergency_save()
        self.checkpointer.wait(self._time_to_kill_s())
        latest = saved or self.checkpointer.store.latest()
        if saved is not None:
            state = f"state saved at step {saved.step}"
        elif latest is not None:
            state = f"the checkpoint of step {latest.step} stands ({self.step - latest.step} steps lost)"
        else:
            state = f"nothing saved ({self.step} steps lost)"
        what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        # the traceback, in case it was a bug of the step's own and not a child's death
        log.warning(
            "%s in the step after %s, taken as part of the stop%s:\n%s",
            what,
            name,
            f" ({why_not})" if why_not else "",
            "".join(traceback.format_exception(error)),
        )
        return RunStopped(
            Status.CANCELLED if request is Request.CANCEL else Status.PREEMPTED,  # a checkpoint request too
            f"{name} received: {state}; the step raised {what}",
            name,
            self.signals.first_received.get(request),
        )


def _update_waits_for_copies(checkpointer: Checkpointer, watchdog: Watchdog) -> Callable[[], None]:
    """What a registered optimizer runs before it steps: the copies a background save left for later
    end first (watched as a save, not as the step: a large state's copy may outlast a step). It holds
    no reference to the session: the registry holds it, and a cycle through the session would keep
    the run's loaders (and their persistent workers) alive until a garbage collection."""

    def before_update() -> None:
        if checkpointer.copies_unchecked():
            with watchdog.slow_work():
                checkpointer.check_copies()

    return before_update
