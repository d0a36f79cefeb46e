"""The save/load life cycle of a run's checkpoints, on one rank or many.

`Checkpointer` owns the checkpoint store of a run: it prepares the
directory, picks and loads the checkpoint to resume from (the same one on
every rank), writes checkpoints (rank 0 writes; every rank learns whether it
worked), keeps the periodic schedule and knows how long a save takes. It is
the seam where sharded and background writing plug in. What goes into a
checkpoint is the session's business (`session/state.py`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ..config import CheckpointConfig
from ..distributed import agree, broadcast_from_rank0, world
from ..errors import CheckpointDirError, CheckpointWriteError
from .store import CheckpointInfo, CheckpointStore
from .writer import Snapshot

log = logging.getLogger("hydra_preempt")


class Checkpointer:
    def __init__(self, store: CheckpointStore, config: CheckpointConfig) -> None:
        self.store = store
        self.config = config
        self.last: CheckpointInfo | None = None  # the newest checkpoint of this run, loaded or saved
        self.last_save_s: float | None = None  # how long this process's last save took
        self.saved_at: float = 0.0  # time.time() at the end of the last save
        self._saved_at_monotonic = time.monotonic()
        self._periodic_pending = False

    def prepare(self) -> None:
        """Create and check the directory, remove stale temporaries (rank 0; every rank learns the verdict)."""
        error = None
        if world()[0] == 0:
            try:
                self.store.prepare()
            except CheckpointDirError as e:
                error = e
        if agree([error is not None])[0]:
            raise error or CheckpointDirError(f"rank 0 cannot use the checkpoint directory {self.store.directory}")

    def load_latest(self) -> tuple[CheckpointInfo, Any] | None:
        """The newest checkpoint that verifies, as (info, state tree), the same on every rank; None if there is none."""
        loaded = self.store.load_latest() if world()[0] == 0 else None
        chosen = broadcast_from_rank0(loaded[0].path.name if loaded else None)
        if chosen is None:
            return None
        info, tree = loaded if loaded else self.store.load_named(chosen)
        self.last = info
        return info, tree

    def periodic_due(self, step: int) -> bool:
        """Whether a periodic save is due after `step`; once due it stays due until a save is made."""
        c = self.config
        due = bool(c.every_steps and step % c.every_steps == 0) or bool(
            c.every_seconds and time.monotonic() - self._saved_at_monotonic >= c.every_seconds
        )
        self._periodic_pending = self._periodic_pending or due
        return self._periodic_pending

    def save(self, step: int, reason: str, metrics: dict[str, float], tree: Any) -> CheckpointInfo:
        """Write the state of `step` (a collective: `tree` on rank 0, None elsewhere).

        A state already on disk is not written twice. Raises CheckpointWriteError on every rank when the write failed.
        """
        if self.last is not None and self.last.step == step:
            return self.last
        started = time.monotonic()
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        error: CheckpointWriteError | None = None
        info = None
        if tree is not None:
            try:
                info = self.store.save(Snapshot.capture(tree), step, reason, metrics)
            except CheckpointWriteError as e:
                error = e
        if agree([error is not None])[0]:
            raise error or CheckpointWriteError(f"rank 0 could not write the checkpoint of step {step}")
        if info is None:
            info = CheckpointInfo(step=step, reason=reason, metrics=metrics, path=self.store.step_path(step))
        self._saved_at_monotonic = time.monotonic()
        self.saved_at = time.time()
        self.last_save_s = self._saved_at_monotonic - started
        self._periodic_pending = False
        self.last = info
        log.info("saved %s (%s, %.1f MB in %.2f s)", info.path.name, reason, info.nbytes / 1e6, self.last_save_s)
        return info
