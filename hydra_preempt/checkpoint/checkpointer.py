"""The save/load life cycle of a run's checkpoints, on one rank or many.

`Checkpointer` owns the checkpoint store of a run: it prepares the
directory, picks and loads the checkpoint to resume from (the same one on
every rank), writes checkpoints, keeps the periodic schedule and knows how
long a save takes. What goes into a checkpoint is the session's business
(`session/state.py`).

A save is a collective. Rank 0 writes the state tree (shared objects, every
rank's own small state). Sharded state is written by every rank in parallel
into the same temporary directory (checkpoint/sharded.py); rank 0 then
writes the manifest, with every file's size and checksum as its writer
computed it, renames the directory into place and applies retention. Every
rank learns whether the save worked; a failure anywhere leaves nothing that
looks complete.

A periodic save may go to the background (`save_in_background`): at the
boundary the state is copied into reused host buffers (tree.HostStaging: rank
0's tree, and every rank's shards after DCP planned them), then each rank's
writer thread (one for the life of the Checkpointer) writes, checksums and
fsyncs while training goes on; rank 0's also renames and applies retention,
or, with sharded state, rank 0 commits once every rank's file is durable. At
most one write is in flight; a periodic save due meanwhile is skipped. The
writer runs no collective (it could deadlock with training's own): whether the write is
done or failed is agreed at a later step boundary (`background_flags` and
`settle`), and every other save waits for it first (`wait`).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..config import CheckpointConfig
from ..distributed import agree, broadcast_from_rank0, gather_to_rank0, world
from ..errors import CheckpointDirError, CheckpointWriteError
from ..fsutil import disk_full_hint
from .layout import CorruptCheckpointError, ShardedFormatError, checkpoint_info, read_manifest
from .store import CheckpointInfo, CheckpointStore
from .tree import HostStaging
from .writer import Snapshot

if TYPE_CHECKING:  # torch.distributed.checkpoint, under sharded.py, is imported when a run has sharded state
    from torch.distributed.checkpoint.metadata import Metadata

    from .sharded import ShardWriter

log = logging.getLogger("hydra_preempt")


@dataclass
class _BackgroundWrite:
    """A save being written by the writer thread: rank 0's (the whole tree), or every rank's (its
    shard file); a rank with nothing to write keeps a record without a write (`done` None)."""

    step: int
    reason: str
    metrics: dict[str, float]
    started: float  # time.monotonic() at the boundary
    done: threading.Event | None = None  # set when the write ended, written or failed
    info: CheckpointInfo | None = None
    error: str | None = None
    finished: float | None = None  # time.monotonic() when the write ended
    snapshot: Snapshot | None = None  # rank 0's staged tree
    # with copies left for later (see save_in_background): set once the writer made them, and once the
    # training thread checked their sources unchanged (`changed`: those that were not; nothing is written)
    staged: threading.Event | None = None
    checked: threading.Event | None = None
    changed: list[str] = field(default_factory=list)
    # sharded state: the temporary directory, DCP's writer (rank 0's knows shards.json) and this
    # rank's file once written; rank 0 commits when every rank's is durable
    sharded: tuple[str, ...] = ()
    tmp: Path | None = None
    writer: ShardWriter | None = None
    files: dict[str, dict] = field(default_factory=dict)

    def pending(self) -> bool:
        return self.done is not None and not self.done.is_set()

    def join(self, timeout_s: float | None) -> None:
        if self.done is not None:
            self.done.wait(None if timeout_s is None else max(0.0, timeout_s))


class _Writer:
    """The thread that runs a Checkpointer's background writes, one after the other, kept from one
    save to the next: starting a thread at each save cost the boundary up to a few ms on a busy
    host (the new thread must run before start() returns); handing a write over does not wait for
    it. A daemon, so that a write stalled on a dead file system cannot keep the process alive."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._serve, args=(self._jobs,), name="checkpoint-writer", daemon=True
            )
            self._thread.start()
        self._jobs.put(job)

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while (job := jobs.get()) is not None:
            job()

    def stop(self) -> threading.Thread | None:
        """End the thread once it is idle (without waiting: a stalled write is left to it); return it,
        for the caller to join. A thread started later gets a queue of its own, so that the stalled
        one never takes its writes."""
        thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            self._jobs, self._thread = queue.SimpleQueue(), None
        return thread


class Checkpointer:
    def __init__(self, store: CheckpointStore, config: CheckpointConfig) -> None:
        self.store = store
        self.config = config
        self.last: CheckpointInfo | None = None  # the newest checkpoint of this run, loaded or saved
        self.last_save_s: float | None = None  # how long this process's last save took
        self.saved_at: float = 0.0  # time.time() at the end of the last save
        self._saved_at_monotonic = time.monotonic()
        self._periodic_pending = False
        self._background: _BackgroundWrite | None = None
        self._writer = _Writer()
        self._staging = HostStaging()  # rank 0's tree
        self._shard_staging = HostStaging()  # this rank's shards
        self._copy_later = config.copy_while_training  # until a copy left for later found its source changed
        self._check_lock = threading.Lock()

    def prepare(self, owner: Callable[[], dict[str, str]] | None = None) -> None:
        """Create the directory, claim it for `owner()` and check it, remove stale temporaries (rank 0,
        under the run lock; every rank learns the verdict)."""
        error = None
        if world()[0] == 0:
            try:
                self.store.prepare(owner() if owner else None)
            except CheckpointDirError as e:
                error = e
        if agree([error is not None])[0]:
            raise error or CheckpointDirError(f"rank 0 cannot use the checkpoint directory {self.store.directory}")

    def load_latest(
        self, check_tree: Callable[[Any, CheckpointInfo], None] | None = None
    ) -> tuple[CheckpointInfo, Any, Metadata | None] | None:
        """The newest checkpoint that verifies, the same on every rank: (info, state tree, metadata of its
        sharded state or None); None if there is none. `check_tree(tree, info)` raises ValueError for a
        tree that does not decode into a state: such a checkpoint is corrupt, like one that fails its checksums."""

        def check(path: Path, manifest: dict, tree: Any) -> None:
            _decode_shards_metadata(path, manifest)
            if check_tree is not None:
                try:
                    check_tree(tree, checkpoint_info(path, manifest))
                except ValueError as e:
                    raise CorruptCheckpointError(str(e)) from None

        loaded = self.store.load_latest(check=check) if world()[0] == 0 else None
        chosen = broadcast_from_rank0(loaded[0].path.name if loaded else None)
        if chosen is None:
            return None
        info, tree = loaded if loaded else self.store.load_named(chosen)
        metadata = _shards_metadata(info.path) if info.sharded else None
        self.last = info
        return info, tree, metadata

    def load_shards(self, info: CheckpointInfo, metadata: Metadata, template: dict[str, Any]) -> None:
        """Read the sharded state of `info` into `template` (a collective); every rank raises on a failure."""
        from . import sharded

        error = None
        try:
            sharded.load_shards(info.path, metadata, template)
        except (sharded.CheckpointException, OSError, ShardedFormatError) as e:
            error = f"{info.path.name}: the sharded state cannot be read ({first_line(e)})"
        if agree([error is not None])[0]:
            raise CorruptCheckpointError(error or f"{info.path.name}: another rank could not read its shards")

    def periodic_due(self, step: int) -> bool:
        """Whether a periodic save is due after `step`; once due it stays due until a save is made."""
        c = self.config
        due = bool(c.every_steps and step % c.every_steps == 0) or bool(
            c.every_seconds and time.monotonic() - self._saved_at_monotonic >= c.every_seconds
        )
        self._periodic_pending = self._periodic_pending or due
        return self._periodic_pending

    def save(
        self, step: int, reason: str, metrics: dict[str, float], tree: Any, shards: dict[str, Any] | None = None
    ) -> CheckpointInfo:
        """Write the state of `step` (a collective: `tree` on rank 0, None elsewhere; `shards`, every
        rank's part of the sharded objects, or None on every rank when there are none).

        A state already on disk is not written twice. Raises CheckpointWriteError on every rank when the write failed.
        """
        self.wait()
        if self.last is not None and self.last.step == step:
            return self.last
        started = time.monotonic()
        if shards is None:
            info = self._save_tree(step, reason, metrics, tree)
        else:
            info = self._save_sharded(step, reason, metrics, tree, shards)
        self._saved(info, started, time.monotonic())
        return info

    def _saved(self, info: CheckpointInfo, started: float, finished: float) -> None:
        self._saved_at_monotonic = finished
        self.saved_at = time.time() - (time.monotonic() - finished)
        self.last_save_s = finished - started
        self._periodic_pending = False
        self.last = info
        log.info("saved %s (%s, %.1f MB in %.2f s)", info.path.name, info.reason, info.nbytes / 1e6, self.last_save_s)

    # -- background saves ----------------------------------------------------------
    def save_in_background(
        self,
        step: int,
        reason: str,
        metrics: dict[str, float],
        tree: Any,
        shards: dict[str, Any] | None = None,
        later: frozenset[int] = frozenset(),
    ) -> bool:
        """Stage the state of `step` (`tree` on rank 0, None elsewhere; `shards` as for `save`) and hand
        it to the writer thread; False if a write is still in flight (this save is skipped). Every rank calls it
        at the same boundary; with sharded state it is a collective (DCP plans the save, rank 0
        makes the directory), without, it communicates nothing.

        `later`: the data_ptr() of CPU tensors that nothing changes before the next optimizer step
        (parameters and state of torch's optimizers): the writer thread copies them while the next
        step computes, and the training thread calls check_copies() before that optimizer step. The
        writer writes only once the training thread has found their version counters unchanged
        (check_copies(): at that update, at the next boundary, or when the run waits for the write);
        a copy whose source changed (other weights loaded in place for an evaluation, an optimizer
        not registered stepping them) is not written, a save is made at the boundary after the next
        (every rank agrees on it at the next), copied at the boundary from then on."""
        self._periodic_pending = False
        if self._background is not None:
            log.info(
                "step %d: periodic checkpoint skipped, the one of step %d is still being written",
                step,
                self._background.step,
            )
            return False
        if self.last is not None and self.last.step == step:
            return True
        write = _BackgroundWrite(step, reason, metrics, time.monotonic())
        if shards is not None:
            if not self._stage_sharded(write, tree, shards):
                return True  # this state is on disk already
            target = self._write_shard
        elif tree is not None:
            try:  # the state at this boundary, in host memory (what `later` names: by the writer, before it changes)
                write.snapshot = Snapshot.capture(tree, self._staging, later if self._copy_later else frozenset())
                if self._staging.copies_left:
                    write.staged, write.checked = threading.Event(), threading.Event()
            except Exception as e:  # surfaces at the next agreement, like a failed write: no rank is left waiting
                write.error = f"could not stage the checkpoint of step {step}: {first_line(e)}"
            target = self._write_tree
        self._background = write
        if write.snapshot is not None or write.writer is not None:
            done = write.done = threading.Event()
            self._writer.submit(lambda: self._run(write, target, done))
        return True

    def _stage_sharded(self, write: _BackgroundWrite, tree: Any, shards: dict[str, Any]) -> bool:
        """DCP plans the save and every rank copies its items to host memory (collectives, at the
        boundary); False if the checkpoint of this step is complete already."""
        write.sharded = tuple(shards)
        tmp, _ = self._begin_sharded(write.step)
        if tmp is None:
            return False
        write.tmp = tmp
        error = None
        try:
            from .sharded import save_shards

            write.writer = save_shards(tmp, shards, self._shard_staging)
            if tree is not None:
                write.snapshot = Snapshot.capture(tree, self._staging)
        except Exception as e:  # every rank reaches the agreement below
            error = f"could not stage the sharded state of step {write.step}: {first_line(e)}"
        if agree([error is not None])[0]:
            self._fail_sharded(tmp, error, write.step)
        return True

    def _run(self, write: _BackgroundWrite, target: Any, done: threading.Event) -> None:
        try:
            target(write)
        except CheckpointWriteError as e:
            write.error = str(e)
        except OSError as e:
            write.error = (
                f"could not write the checkpoint of step {write.step} in {self.store.directory}: {first_line(e)}"
            )
        except Exception as e:  # a bug, not an I/O error: still one line, on every rank
            write.error = f"the background save of step {write.step} failed: {type(e).__name__}: {e}"
        finally:
            write.finished = time.monotonic()
            if write.staged is not None:  # never left unset: the training thread waits on it
                write.staged.set()
            done.set()

    def _write_tree(self, write: _BackgroundWrite) -> None:
        assert write.snapshot is not None
        if write.staged is not None and write.checked is not None:
            try:
                write.snapshot.finish_staging()
            finally:
                write.staged.set()
            write.checked.wait()
            if write.changed:
                return
        write.info = self.store.save(write.snapshot, write.step, write.reason, write.metrics)

    def copies_unchecked(self) -> bool:
        """Whether the write in flight has copies left for later that check_copies() has not checked."""
        w = self._background
        return w is not None and w.checked is not None and not w.checked.is_set()

    def check_copies(self) -> None:
        """On the training thread: wait for the copies left for later, then find whether their sources
        changed since the capture (every in-place operation this thread began has returned, so
        their version counters tell); the writer writes or drops the snapshot accordingly."""
        w = self._background
        if w is None or w.staged is None or w.checked is None or w.checked.is_set():
            return
        w.staged.wait()
        assert w.snapshot is not None
        with self._check_lock:  # the training thread, or the watchdog's standing() at a hang
            if not w.checked.is_set():
                w.changed = w.snapshot.changed_since_capture()
                w.checked.set()

    def _write_shard(self, write: _BackgroundWrite) -> None:
        assert write.writer is not None
        write.files = write.writer.write_staged()

    def standing(self, wait_s: float) -> CheckpointInfo | None:
        """The newest checkpoint on disk, for a process about to end without a boundary (a hang): a
        background write in flight may finish (up to `wait_s`; its retention may have deleted `last`
        already) before the next boundary would have settled it. Safe on another thread while the
        training thread is stuck; it checks the copies left for later itself (the writer waits for
        that check): a training thread stuck for the hang's timeout is not in the middle of changing
        a parameter."""
        w = self._background
        if w is not None and w.done is not None and w.tmp is None:  # a state tree, renamed by the writer itself
            deadline = time.monotonic() + wait_s
            if w.staged is not None and w.staged.wait(wait_s):
                self.check_copies()
            w.done.wait(max(0.0, deadline - time.monotonic()))
            if w.done.is_set() and w.error is None and w.info is not None:
                return w.info
        return self.last  # a sharded write is committed only at a boundary: it changes nothing on disk

    def background_flags(self) -> list[int]:
        """This rank's [write still in flight, write failed], to be agreed at a step boundary."""
        self.check_copies()
        w = self._background
        if w is None:
            return [0, 0]
        if w.done is None:
            return [0, int(w.error is not None)]
        pending = w.pending()
        return [int(pending), int(not pending and w.error is not None)]

    def settle(self, pending: bool, failed: bool) -> None:
        """Take the agreed state of the background write: done -> it is the newest checkpoint; failed ->
        CheckpointWriteError on every rank (the previous checkpoint intact); in flight -> nothing."""
        w = self._background
        if w is None or pending:
            return
        self._background = None
        if w.tmp is not None:
            info = self._commit_sharded(w, failed)
        elif failed:
            raise CheckpointWriteError(w.error or f"rank 0 could not write the checkpoint of step {w.step}")
        elif w.changed:
            self._copy_later, self._periodic_pending = False, True
            log.warning(
                "the periodic checkpoint of step %d was not written: %s changed in place before the next optimizer "
                "step (other weights loaded for an evaluation? an optimizer that is not registered?); a checkpoint is saved at the "
                "step boundary after the next, and checkpoints are copied at the boundary from now on",
                w.step,
                f"{len(w.changed)} tensor(s) ({w.changed[0]})",
            )
            return
        else:
            info = w.info or CheckpointInfo(
                step=w.step, reason=w.reason, metrics=w.metrics, path=self.store.step_path(w.step)
            )
        self._saved(info, w.started, w.finished or time.monotonic())

    def _commit_sharded(self, w: _BackgroundWrite, failed: bool) -> CheckpointInfo:
        """Every rank's shard is durable: rank 0 gathers their sizes and checksums, writes the rest and
        the manifest, renames (a collective, at a step boundary)."""
        assert w.tmp is not None
        parts = gather_to_rank0((w.files, w.error))  # every rank's file, or why it has none
        error = None
        info = None
        if world()[0] == 0:
            assert parts is not None and w.writer is not None and w.snapshot is not None
            failures = [f"rank {rank}: {why}" for rank, (_, why) in enumerate(parts) if why]
            if failures or failed:
                error = (
                    failures[0] if failures else f"a rank could not write its part of the checkpoint of step {w.step}"
                )
            else:
                files = dict(w.writer.files)
                for part, _ in parts:
                    files.update(part)
                try:
                    info = self.store.commit(w.tmp, w.snapshot, w.step, w.reason, w.metrics, files, list(w.sharded))
                except Exception as e:  # every rank reaches the agreement below
                    error = first_line(e)
        if agree([error is not None])[0]:
            self._fail_sharded(w.tmp, error or w.error, w.step)
        return info or CheckpointInfo(
            step=w.step, reason=w.reason, metrics=w.metrics, path=self.store.step_path(w.step), sharded=w.sharded
        )

    def wait(self, timeout_s: float | None = None) -> bool:
        """Let the write in flight end and settle it (a collective on multi-rank runs). With a timeout
        (the time left before the kill): False if the write is still in flight on some rank after it,
        agreed by every rank; it is then left to the writer thread (a stalled file system must not keep a
        stopping job from ending; the previous checkpoint stands, and its temporary directory is
        removed at the next start)."""
        w = self._background
        if w is None:
            return True
        self.check_copies()
        w.join(timeout_s)
        pending, failed = agree(self.background_flags())
        if pending:
            log.error(
                "the checkpoint of step %d is still being written after %.1f s; not waiting for it any longer",
                w.step,
                time.monotonic() - w.started,
            )
            return False
        try:
            self.settle(False, bool(failed))
        except CheckpointWriteError as e:  # the save that waits is still made (and fails on its own if it must)
            log.error("%s", e)
        return True

    def join(self, timeout_s: float | None = None) -> None:
        """Let the write in flight end (for at most `timeout_s`), without any collective (closing, maybe
        after an error), and the writer thread with it; log a failure, or that it was left unfinished."""
        self.check_copies()
        w, self._background = self._background, None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        thread = self._writer.stop()  # ends once the write in flight (if any) has
        if w is not None and w.done is not None:
            w.join(timeout_s)
        if thread is not None and not (w is not None and w.pending()):
            # The write is done, but the thread may still be releasing its buffers: a thread inside
            # torch while the interpreter exits aborts the process ("terminate called without an
            # active exception"), so it ends before the run does.
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if w is None or w.done is None:
            return
        if w.pending():
            log.error("the checkpoint of step %d was not finished before the process ended", w.step)
        elif w.error:
            log.error("%s", w.error)
        elif w.info is not None:  # rank 0's whole tree is complete (a sharded one needs the ranks' commit)
            self._saved(w.info, w.started, w.finished or time.monotonic())

    def set_aside(self, suspect: Callable[[list[CheckpointInfo]], list[CheckpointInfo]], why: str) -> int:
        """After a divergence: let the write in flight end, then (rank 0) rename the checkpoints that
        `suspect` picks from the complete ones as diverged-step-... (nothing is deleted; index.json is
        rewritten). Returns the step a restart resumes from (0: none), on every rank (a collective)."""
        self.wait()  # a background save of a suspect state would otherwise land after this
        latest: CheckpointInfo | None = None
        if world()[0] == 0:
            doomed = suspect(self.store.complete())
            try:
                for info in doomed:
                    self.store.set_aside(info.path, "diverged", why)
                if doomed:
                    self.store.apply_retention()  # index.json: the new latest; fewer checkpoints, none deleted
            except OSError as e:
                log.error("could not set suspect checkpoints aside: %s", first_line(e))
            latest = self.store.latest()
        step = broadcast_from_rank0(latest.step if latest else None)
        self.last = latest or (
            None if step is None else CheckpointInfo(step=step, reason="", path=self.store.step_path(step))
        )
        return step or 0

    def in_flight_s(self) -> float:
        """About how long until the write in flight is durable: the last save's duration less its age."""
        w = self._background
        if w is None or not w.pending():
            return 0.0
        return max(0.0, (self.last_save_s or 0.0) - (time.monotonic() - w.started))

    def _save_tree(self, step: int, reason: str, metrics: dict[str, float], tree: Any) -> CheckpointInfo:
        """Rank 0 writes the whole state; every rank learns whether it worked."""
        error: Exception | None = None
        info = None
        if tree is not None:
            try:
                info = self.store.save(Snapshot.capture(tree), step, reason, metrics)
            except Exception as e:  # raised after the agreement: the other ranks must not be left waiting
                error = e
        if agree([error is not None])[0]:
            raise error or CheckpointWriteError(f"rank 0 could not write the checkpoint of step {step}")
        return info or CheckpointInfo(step=step, reason=reason, metrics=metrics, path=self.store.step_path(step))

    def _save_sharded(
        self, step: int, reason: str, metrics: dict[str, float], tree: Any, shards: dict[str, Any]
    ) -> CheckpointInfo:
        """Every rank writes its shards into rank 0's temporary directory; rank 0 writes the rest and the manifest."""
        rank = world()[0]
        tmp, existing = self._begin_sharded(step)
        if tmp is None:  # this state is on disk already
            return existing or CheckpointInfo(step=step, reason=reason, path=self.store.step_path(step))
        from . import sharded

        error: str | None = None
        files: dict[str, dict] = {}
        try:
            files = sharded.save_shards(tmp, shards).files
        except (sharded.CheckpointException, OSError, RuntimeError, TypeError) as e:
            error = f"could not write the sharded state of step {step} in {self.store.directory}: {first_line(e)}"
        info = None
        if rank == 0 and error is None:
            try:
                info = self.store.commit(tmp, Snapshot.capture(tree), step, reason, metrics, files, list(shards))
            except Exception as e:  # every rank reaches the agreement below
                error = first_line(e)
        if agree([error is not None])[0]:
            self._fail_sharded(tmp, error, step)
        return info or CheckpointInfo(
            step=step, reason=reason, metrics=metrics, path=self.store.step_path(step), sharded=tuple(shards)
        )

    def _begin_sharded(self, step: int) -> tuple[Path | None, CheckpointInfo | None]:
        """Rank 0 makes the temporary directory every rank writes into (a collective): (its path, None),
        or (None, the complete checkpoint of `step` as rank 0 read it; None on other ranks) if there is
        one already. Raises CheckpointWriteError on every rank."""
        tmp: Path | None = None
        existing: CheckpointInfo | None = None
        error: str | None = None
        if world()[0] == 0:
            existing = self.store.existing(step)
            if existing is None:
                try:
                    tmp = self.store.begin(step)
                except CheckpointWriteError as e:
                    error = str(e)
        name = broadcast_from_rank0("" if error else tmp.name if tmp else None)
        if name is None:
            return None, existing
        if not name:
            raise CheckpointWriteError(error or f"rank 0 could not start the checkpoint of step {step}")
        return self.store.directory / name, None

    def _fail_sharded(self, tmp: Path, error: str | None, step: int) -> None:
        """After every rank agreed that a sharded save failed: rank 0 removes it; every rank raises."""
        if world()[0] == 0:
            self.store.abort(tmp)
            error = f"{error or 'another rank failed'}; {self.store.intact_note()}"
        raise CheckpointWriteError(error or f"another rank could not write its part of the checkpoint of step {step}")


def _shards_metadata(path: Path) -> Metadata:
    from .sharded import read_shards_metadata

    return read_shards_metadata(path, read_manifest(path)["files"])


def _decode_shards_metadata(path: Path, manifest: dict) -> None:
    """A check of a checkpoint while choosing which to load: its sharded metadata decodes."""
    if manifest.get("sharded"):
        try:
            _shards_metadata(path)
        except (OSError, ShardedFormatError) as e:
            raise CorruptCheckpointError(str(e)) from None


def first_line(e: BaseException) -> str:
    dcp_api = sys.modules.get("torch.distributed.checkpoint.api")  # none of its exceptions exist without it
    if dcp_api is not None and isinstance(e, dcp_api.CheckpointException):  # every rank's failure: the first
        failures = getattr(e, "failures", {}) or {}
        if failures:
            rank, failure = sorted(failures.items())[0]
            if isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
                failure = failure[0]  # DCP wraps each as (exception, traceback summary)
            return f"rank {rank}: {first_line(failure)}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + disk_full_hint(e)
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
