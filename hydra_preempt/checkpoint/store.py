"""A directory of checkpoints: atomic saves, verified loads with fallback, retention.

checkpoints/
  step-000000100/          one complete checkpoint (see writer.py)
  step-000000150/
  index.json               latest and best-N, rewritten before any deletion
  OWNER.json               the run this directory belongs to (run id and run directory)
  .tmp-step-...            a save in progress (or interrupted: removed on start)
  .deleting-step-...       a checkpoint being deleted (renamed first, so no
                           half-deleted directory ever carries a final name)
  corrupt-step-...         a checkpoint that failed verification, kept for
                           inspection and never loaded again
  diverged-step-...        a checkpoint of a run that diverged, newer than its
                           last healthy one (session/divergence.py): never loaded again
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from ..config import CheckpointConfig
from ..errors import CheckpointDirError, CheckpointWriteError
from ..fsutil import atomic_write_text, create_file, disk_full_hint, fsync_dir, read_regular, umask
from .layout import (
    REASONS,
    CheckpointInfo,
    CorruptCheckpointError,
    checkpoint_info,
    complete_checkpoints,
    final_dirs,
    latest_checkpoint,
    read_manifest,
    step_dir_name,
)
from .retention import RetentionPlan, RetentionPolicy
from .writer import Snapshot, read_checkpoint_files, write_checkpoint_files

log = logging.getLogger("hydra_preempt.checkpoint")

INDEX_FILE = "index.json"
OWNER_FILE = "OWNER.json"  # {"run_id", "run_dir"} of the run the directory belongs to
# Temporaries: a save in progress, a deletion, an index rewrite (fsutil.atomic_write_bytes), a probe
_STALE_PREFIXES = (".tmp-step-", ".deleting-", f".{INDEX_FILE}.tmp-", ".write-probe.")


class CheckpointStore:
    def __init__(
        self,
        directory: Path | str,
        policy: RetentionPolicy | None = None,
        gpu_summary: Callable[[], dict[str, dict[str, Any]] | None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.policy = policy or RetentionPolicy.from_config(CheckpointConfig())
        # the GPU figures of this process so far (GpuSampler.summary), written into each manifest
        self.gpu_summary = gpu_summary

    # -- start-up -------------------------------------------------------
    def prepare(self, owner: dict[str, str] | None = None) -> list[str]:
        """Create the directory, check it is writable, claim it for `owner`, remove stale temporaries.

        Called only while the run lock is held: no other process of this run is alive, so every
        temporary (a save or deletion in progress, an index being rewritten, from this host or any
        other) was left by an interrupted one. `owner` ({"run_id", "run_dir"}) marks the directory
        as this run's (OWNER_FILE); a directory marked by another run is refused, as two runs
        writing one directory would resume from each other's state. Returns the names removed.
        Raises CheckpointDirError with the reason.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-probe.{secrets.token_hex(8)}"
            create_file(probe).close()
            probe.unlink()
        except OSError as e:
            raise CheckpointDirError(
                f"checkpoint directory {self.directory} is not usable: {e.strerror or e}"
            ) from None
        if owner is not None:
            self._claim(owner)
        removed = []
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(_STALE_PREFIXES):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
                log.info("removed %s left by an interrupted save, deletion or index update", entry.name)
        return removed

    def _claim(self, owner: dict[str, str]) -> None:
        """Mark the directory as `owner`'s run, or refuse it if another run's mark is there."""
        path = self.directory / OWNER_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                mark = json.loads(read_regular(path, 4096))
                holder = mark["run_id"], mark["run_dir"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointDirError(
                    f"checkpoint directory {self.directory} has an unreadable {OWNER_FILE}: which run it "
                    "belongs to is unknown; remove that file if the directory is this run's"
                ) from None
            if holder[0] != owner["run_id"]:
                raise CheckpointDirError(
                    f"checkpoint directory {self.directory} belongs to another run ({holder[1]}, run id "
                    f"{holder[0]}): give each run its own checkpoint.dir"
                ) from None
            return
        except OSError as e:
            raise CheckpointDirError(
                f"checkpoint directory {self.directory} is not usable: {e.strerror or e}"
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(owner) + "\n")
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(self.directory)
        except OSError as e:
            path.unlink(missing_ok=True)
            raise CheckpointDirError(
                f"checkpoint directory {self.directory} is not usable{disk_full_hint(e)}: {e.strerror or e}"
            ) from None

    # -- listing --------------------------------------------------------
    def complete(self) -> list[CheckpointInfo]:
        """Checkpoints whose manifest is present and readable, by ascending step (contents verified on load)."""
        return complete_checkpoints(self.directory)

    def latest(self) -> CheckpointInfo | None:
        return latest_checkpoint(self.directory)

    def step_path(self, step: int) -> Path:
        return self.directory / step_dir_name(step)

    # -- saving ---------------------------------------------------------
    def save(
        self, snapshot: Snapshot, step: int, reason: str, metrics: dict[str, float] | None = None
    ) -> CheckpointInfo:
        """Write a complete checkpoint atomically, then apply retention.

        On failure (disk full included) nothing new is visible and the
        previous checkpoints are untouched; CheckpointWriteError says why.
        """
        existing = self.existing(step)
        if existing is not None:
            return existing
        return self.commit(self.begin(step), snapshot, step, reason, metrics)

    def existing(self, step: int) -> CheckpointInfo | None:
        """The complete checkpoint of `step` if there is one (the same state: no need to write it again)."""
        final = self.step_path(step)
        if not os.path.lexists(final):
            return None
        if final.is_symlink() or not final.is_dir():  # no checkpoint (layout.final_dirs): never followed
            self._quarantine(final, "not a directory of its own (a link, or a file)")
            return None
        try:
            return checkpoint_info(final, read_manifest(final))
        except CorruptCheckpointError as e:
            self._quarantine(final, str(e))
            return None

    def begin(self, step: int) -> Path:
        """A new, empty temporary directory for the checkpoint of `step` (other ranks may write into it).

        Its name is unpredictable and it is this user's alone (mode 0700) until commit(): in a directory
        shared with other users nobody else can plant a link inside it for a file to be written through
        (torch.distributed.checkpoint's shard files included)."""
        tmp = self.directory / f".tmp-step-{step:09d}.{_hostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.mkdir(mode=0o700)
        except OSError as e:
            raise self._write_error(step, e) from e
        return tmp

    def commit(
        self,
        tmp: Path,
        snapshot: Snapshot,
        step: int,
        reason: str,
        metrics: dict[str, float] | None = None,
        shards: dict[str, dict] | None = None,
        sharded: list[str] | None = None,
    ) -> CheckpointInfo:
        """Write this rank's files and, last, the manifest into `tmp`; rename it into place; apply retention.

        `shards` are the files other ranks wrote into `tmp` (name -> size and checksum); `sharded`
        names the objects they hold. On failure `tmp` is removed and CheckpointWriteError raised.
        """
        if reason not in REASONS:
            raise ValueError(f"unknown checkpoint reason {reason!r}; one of {REASONS}")
        final = self.step_path(step)
        meta = {"step": step, "reason": reason, "metrics": finite_metrics(metrics or {}, step)}
        if sharded:
            meta["sharded"] = sorted(sharded)
        if gpus := self._gpus():
            meta["gpus"] = gpus
        try:
            manifest = write_checkpoint_files(tmp, snapshot, meta, shards)
            os.chmod(tmp, 0o777 & ~umask())  # complete: as mkdir would have made it
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(self.directory)
        except OSError as e:
            self.abort(tmp)
            raise self._write_error(step, e) from e
        info = checkpoint_info(final, manifest)
        try:
            self.apply_retention()
        except OSError as e:  # the new checkpoint is complete and durable: that stands
            log.warning(
                "checkpoint step %d is complete, but retention failed%s: %s; older checkpoints are kept",
                step,
                disk_full_hint(e),
                e.strerror or e,
            )
        return info

    def _gpus(self) -> dict[str, dict[str, Any]] | None:
        try:
            return self.gpu_summary() if self.gpu_summary is not None else None
        except Exception as e:  # figures about the run never cost a checkpoint
            log.warning("no GPU figures in this checkpoint's manifest: %s", e)
            return None

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def _write_error(self, step: int, e: OSError) -> CheckpointWriteError:
        return CheckpointWriteError(
            f"could not write checkpoint for step {step} in {self.directory}{disk_full_hint(e)}: "
            f"{e.strerror or e}; {self.intact_note()}"
        )

    def intact_note(self) -> str:
        """What a failed save left standing, for its error message."""
        previous = self.latest()
        return f"checkpoint step {previous.step} is intact" if previous else "no earlier checkpoint exists"

    def apply_retention(self) -> RetentionPlan:
        """Record latest and best-N in index.json first, then delete what the policy lets go."""
        infos = self.complete()
        plan = self.policy.plan(infos)
        by_step = {i.step: i for i in infos}
        index = {
            "latest": infos[-1].step if infos else None,
            "best": [
                {"step": s, str(self.policy.metric): by_step[s].metrics.get(str(self.policy.metric))} for s in plan.best
            ],
            "metric": self.policy.metric,
            "mode": self.policy.mode,
            "checkpoints": [
                {"step": i.step, "reason": i.reason, "metrics": dict(i.metrics)} for i in infos if i.step in plan.keep
            ],
        }
        written = self._write_index(index, retry=False)
        for step in plan.delete:
            path = by_step[step].path
            doomed = path.with_name(f".deleting-{path.name}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            log.debug("retention removed %s", path.name)
        if plan.delete:
            fsync_dir(self.directory)
        if not written:
            self._write_index(index, retry=True)
        return plan

    def _write_index(self, index: dict, retry: bool) -> bool:
        """Write index.json; on a failure (a full disk) remove the old one, so that it never names a
        checkpoint retention is about to delete. The retry, after deletions freed space, only warns:
        the index is a summary, the checkpoints themselves are complete, the next save writes it."""
        path = self.directory / INDEX_FILE
        try:
            atomic_write_text(path, json.dumps(index, indent=1))
            return True
        except OSError as e:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            if retry:
                log.warning(
                    "%s could not be written%s: %s; the checkpoints are complete, the next save writes it",
                    path,
                    disk_full_hint(e),
                    e.strerror or e,
                )
            return False

    # -- loading --------------------------------------------------------
    def load(self, info: CheckpointInfo) -> Any:
        """Read and verify one checkpoint. Raises CorruptCheckpointError."""
        return read_checkpoint_files(info.path, read_manifest(info.path))

    def load_named(self, name: str) -> tuple[CheckpointInfo, Any]:
        """Read the checkpoint directory `name`, which another rank chose and verified (its sharded
        files are not hashed again here). Raises CorruptCheckpointError."""
        path = self.directory / name
        manifest = read_manifest(path)
        return checkpoint_info(path, manifest), read_checkpoint_files(path, manifest, verify_shards=False)

    def load_latest(self, check: Callable[[Path, dict, Any], None] | None = None) -> tuple[CheckpointInfo, Any] | None:
        """The newest checkpoint that verifies (and passes `check(path, manifest, tree)`), falling back to older ones.

        Any newer directory that fails verification is reported and moved
        aside as corrupt-step-..., so that it is never picked again and
        never counted by retention, yet nothing is deleted.
        """
        for path in sorted(final_dirs(self.directory), key=lambda p: p.name, reverse=True):
            try:
                manifest = read_manifest(path)
                tree = read_checkpoint_files(path, manifest)
                if check is not None:
                    check(path, manifest, tree)
            except CorruptCheckpointError as e:
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path.name, e)
                self._quarantine(path, str(e))
                continue
            return checkpoint_info(path, manifest), tree
        return None

    def _quarantine(self, path: Path, why: str) -> None:
        self.set_aside(path, "corrupt", why)

    def set_aside(self, path: Path, label: str, why: str) -> Path:
        """Rename a checkpoint to LABEL-step-...-TIME: never loaded or counted by retention again, nothing deleted."""
        target = path.with_name(f"{label}-{path.name}-{int(time.time())}")
        os.rename(path, target)
        fsync_dir(self.directory)
        log.warning("moved %s aside as %s: %s", path.name, target.name, why)
        return target


def finite_metrics(metrics: dict[str, float], step: int) -> dict[str, float]:
    """The metrics a manifest records: finite ones (a NaN loss is no ranking; the manifest verifies them)."""
    dropped = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if dropped:
        log.warning("checkpoint step %d: metrics %s are not finite and are left out of its manifest", step, dropped)
    return {k: v for k, v in metrics.items() if k not in dropped}


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
