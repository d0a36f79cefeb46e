"""The stop protocol for a Lightning program: `fit(trainer, model, ...)` in place of `trainer.fit(model, ...)`.

    from hydra_preempt.lightning import exit_with, fit
    ...
    exit_with(fit(trainer, model, datamodule=dm, run_dir="runs/mine"))   # was: trainer.fit(model, dm)

`fit()` runs `trainer.fit` under `run()`: the session's signal handlers, checkpoints, run log, watchdog
and requeue, as for a plain loop. The Lightning checkpoint (what `trainer.save_checkpoint` writes:
module, optimizers, schedulers, loops' progress, callbacks, precision plugin, datamodule) is one object
of the session's state, beside every RNG; it is written through the project's atomic, verified store
and given back to Lightning as `fit(ckpt_path=...)` on a restart.

Step boundaries: after each optimizer step, where Lightning itself saves and resumes (its
`ModelCheckpoint` points): at the step's `on_train_batch_end`, or, when a validation runs after that
batch, at its `on_validation_end`. There the session saves, and stops (RunStopped, which Lightning
re-raises) when a signal asked for it: never inside a signal handler. Lightning's own SIGTERM and
SLURM requeue handlers are not installed, so nothing is done twice.

The training DataLoader is positioned exactly (loader_position.py, workers included): Lightning
fetches one batch ahead, so its saved position is the one before that batch was fetched, with the
generator states of that moment; a resumed pass fetches it again from them, then the generators are
set to the checkpoint's. Requires `lightning` (the `[lightning]` extra).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Generator, Mapping

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader

from .config import SessionConfig
from .errors import ConfigError
from .outcome import Outcome
from .session.api import Session
from .session.framework_loader import FrameworkLoader
from .session.runner import run
from .session.state import RngReads, module_mismatches
from .slurm.policy import exit_with

log = logging.getLogger("hydra_preempt")

__all__ = ["exit_with", "fit", "train"]


def fit(
    trainer: Trainer,
    model: LightningModule,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    datamodule: LightningDataModule | None = None,
    *,
    run_dir: Path | str,
    config: SessionConfig | Mapping[str, Any] | None = None,
) -> Outcome:
    """`trainer.fit(model, train_dataloaders, val_dataloaders, datamodule)` under the stop protocol;
    the outcome, for `exit_with()` (exit 75 and the requeue on a stop; its result, when finished, the
    final scalars of `trainer.callback_metrics`). `config`: as for `run()`."""
    if isinstance(config, SessionConfig):
        config = copy.deepcopy(config)  # train() turns its emergency checkpoints off: not the caller's

    def train_fn(session: Session) -> dict[str, float]:
        return train(session, trainer, model, train_dataloaders, val_dataloaders, datamodule)

    return run(train_fn, run_dir, config)


def train(
    session: Session,
    trainer: Trainer,
    model: LightningModule,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    datamodule: LightningDataModule | None = None,
) -> dict[str, float]:
    """`trainer.fit(...)` as the training function of a session: what fit() runs under run(), and what a
    door's training function calls (`PreemptibleTask(lambda session: train(session, trainer, model))`).
    Returns the final scalars of `trainer.callback_metrics` (the run's RUN_DIR/result.json: `hydra-preempt
    status` shows them, a sweep's job returns them).
    The session's emergency checkpoints are turned off: Lightning's state inside a step is none it
    resumes from, so an exception in its loop leaves the last checkpoint standing."""
    if not isinstance(trainer, Trainer) or not isinstance(model, LightningModule):
        raise ConfigError("hydra_preempt.lightning takes a lightning Trainer and a LightningModule")
    if trainer.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"a Trainer of {trainer.world_size} processes starts them itself, each a run of its own: start "
            "them with srun (one task per process), whose tasks run() makes one process group"
        )
    hpc = trainer._checkpoint_connector._hpc_resume_path
    if hpc is not None and SLURMEnvironment.detect():
        raise ConfigError(
            f"Lightning would resume from its own {hpc} (a pickle, never verified) when no checkpoint of this "
            "run is there: move it out of the Trainer's default_root_dir"
        )
    session.config.checkpoint.emergency = False
    state = _TrainerState(trainer, model, cast=session.config.checkpoint.cast_dtype)
    positions = _LoaderPositions(trainer, session.state.rng_reads)
    session.register(lightning=state)
    session.register_per_rank(data=positions)
    session.restore()
    if state.result is not None:
        # the run had finished (its final checkpoint): Lightning started again would train on past an early
        # stop (trainer.should_stop is not in its checkpoint)
        return dict(state.result)
    restored = session.last_checkpoint
    # the name Lightning logs ("Restoring states from the checkpoint path at ..."); loaded from the store
    state.restored_path = str(restored.path) if state.loaded is not None and restored is not None else None
    callback = _Boundaries(session, state)
    trainer.callbacks.append(callback)  # type: ignore[attr-defined]
    strategy = trainer.strategy
    original_io, original_process = strategy.checkpoint_io, strategy.process_dataloader
    strategy.checkpoint_io = _FromStore(original_io, state)
    signals = trainer._signal_connector
    # Lightning's SIGTERM notifier and SLURM requeue handler would act on the session's signals too
    signals.register_signal_handlers = lambda: None  # type: ignore[method-assign]

    def process_dataloader(dataloader: object) -> object:
        dataloader = original_process(dataloader)
        if not trainer.training:
            if state.val_workers_made and _persistent(dataloader):
                # an uninterrupted run made these workers before the save (at its sanity check, under
                # Lightning's isolate_rng, or at an earlier validation): made again, they draw nothing
                with torch.random.fork_rng(devices=[]):
                    iter(dataloader)  # type: ignore[call-overload]
            return dataloader
        if not isinstance(dataloader, DataLoader):  # a resumed run would start it over: other data
            raise ConfigError(
                f"the training data is a {type(dataloader).__name__}, not a DataLoader: hydra_preempt.lightning "
                "resumes torch's DataLoader and torchdata's StatefulDataLoader at their exact next batch, nothing else"
            )
        positioned = positions.positioned(dataloader)  # the training loader, as Lightning made it
        if positioned.ahead and trainer.limit_train_batches not in (1.0, None):
            # Lightning's fetcher stops a loader it prefetches at the limit with a batch taken beyond it:
            # measured, the resumed run differed from its first step
            raise ConfigError(
                "limit_train_batches with a training loader that has no length is not resumed exactly by "
                "hydra_preempt.lightning: give the loader a length (a sampler with __len__) or drop the limit"
            )
        return positioned

    strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]
    try:
        trainer.fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path=state.restored_path)
    finally:
        callback.close()
        trainer.callbacks.remove(callback)  # type: ignore[attr-defined]
        strategy.checkpoint_io = original_io
        del strategy.process_dataloader, signals.register_signal_handlers
    state.result = _scalars(trainer.callback_metrics)  # in the final checkpoint, which run() saves next
    return state.result


class _TrainerState:
    """The trainer's checkpoint as one object of the session's state: state_dict() is Lightning's own
    checkpoint of this moment but the training loaders' positions (each rank's own: _LoaderPositions);
    a loaded one waits for `trainer.fit(ckpt_path=restored_path)`."""

    def __init__(self, trainer: Trainer, model: LightningModule, cast: bool = False) -> None:
        self.trainer, self.model = trainer, model
        self.cast = cast  # checkpoint.cast_dtype: the module's tensors of another dtype are loaded cast
        self.loaded: dict[str, Any] | None = None
        self.restored_path: str | None = None  # what fit(ckpt_path=...) is given when a checkpoint was loaded
        self.callback_metrics: dict[str, float] = {}  # trainer.callback_metrics at the save, given back at the start
        self.val_workers_made = False  # whether the saved run had made its validation loaders' persistent workers
        self.result: dict[str, float] | None = None  # fit()'s final metrics, once it returned: the run finished

    def state_dict(self) -> dict[str, Any]:
        if self.trainer.lightning_module is None:  # before fit attached the model: nothing newer than the load
            if self.loaded is None:
                raise ConfigError("no Lightning state before trainer.fit() began")
            return self.loaded
        checkpoint = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        _without_loader_states(checkpoint)
        for key in _HYPER_PARAMETERS:  # any Python object (a Path, an OmegaConf config): the program makes them
            checkpoint.pop(key, None)
        # what callbacks and the run's metrics see until the next validation (Lightning keeps none of it),
        # and whether the validation loaders' persistent workers exist (their base seed was drawn)
        val = self.trainer.fit_loop.epoch_loop.val_loop._combined_loader
        made = any(_persistent(d) and d._iterator is not None for d in (val.flattened if val is not None else []))
        checkpoint[_OWN_KEY] = {
            "callback_metrics": _scalars(self.trainer.callback_metrics),
            "val_workers_made": made,
            "result": self.result,
        }
        return checkpoint

    def check_state_dict(self, state: Any) -> list[str]:
        loops = state.get("loops") if isinstance(state, dict) else None
        if not (isinstance(loops, dict) and "fit_loop" in loops and isinstance(state.get("state_dict"), dict)):
            return ["the checkpoint holds no Lightning checkpoint (state_dict, loops)"]
        return module_mismatches("state_dict", self.model, state["state_dict"], self.cast)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        own = state.pop(_OWN_KEY, {})
        self.callback_metrics = dict(own.get("callback_metrics", {}))
        self.val_workers_made = own.get("val_workers_made") is True
        result = own.get("result")
        self.result = {k: float(v) for k, v in result.items()} if isinstance(result, dict) else None
        callbacks = state.get("callbacks")
        if isinstance(callbacks, dict):
            state["callbacks"] = {k: _confined(k, v) for k, v in callbacks.items()}
        self.loaded = state


def _persistent(loader: Any) -> bool:
    return isinstance(loader, DataLoader) and loader.num_workers > 0 and bool(loader.persistent_workers)


_HYPER_PARAMETERS = ("hyper_parameters", "hparams_name", "datamodule_hyper_parameters", "datamodule_hparams_name")
_CHECKPOINT_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


def _confined(name: str, state: Any) -> Any:
    """A ModelCheckpoint's state with every file it names inside its own directory: Lightning deletes
    the files it names (a k-th best replaced), so a path out of it is dropped, with a warning."""
    if not (isinstance(state, dict) and isinstance(state.get("dirpath"), str)):
        return state
    root = Path(state["dirpath"]).resolve()

    def inside(path: Any) -> bool:
        return path is None or (isinstance(path, str) and (not path or root in Path(path).resolve().parents))

    outside = [
        p for p in (*(state.get(k) for k in _CHECKPOINT_PATHS), *(state.get("best_k_models") or {})) if not inside(p)
    ]
    if not outside:
        return state
    log.warning("%s: the checkpoint names files out of %s (%s): not restored", name, root, str(outside[0])[:120])
    state = {**state, **{k: "" for k in _CHECKPOINT_PATHS if k in state}}
    state["best_k_models"] = {p: v for p, v in (state.get("best_k_models") or {}).items() if inside(p)}
    return state


def _without_loader_states(checkpoint: dict[str, Any]) -> None:
    """Lightning puts its stateful training loaders' states (_PositionedLoader's) into its fit loop's
    own; they are saved per rank apart (_LoaderPositions)."""
    own = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict")
    if isinstance(own, dict):
        own.pop("combined_loader", None)


class _LoaderPositions:
    """The positions of the training loaders Lightning iterates, each rank's own (its shard of the data,
    its workers' generators). A loaded one goes into each loader when Lightning makes it, before its
    first iter(), which may come before Lightning's own restore (a configure_optimizers() that asks for
    trainer.estimated_stepping_batches makes the loaders)."""

    def __init__(self, trainer: Trainer, rng: RngReads) -> None:
        self.trainer, self.rng = trainer, rng
        self._pending: list[Any] = []  # loaded positions of loaders not made yet

    def positioned(self, loader: DataLoader) -> _PositionedLoader:
        """The training loader as Lightning made it, positioned: at the saved position, on a restart."""
        positioned = _PositionedLoader(loader, self.rng)
        if self._pending:
            positioned.load_state_dict(self._pending.pop(0))
        return positioned

    def state_dict(self) -> dict[str, Any]:
        combined = self.trainer.fit_loop._combined_loader
        if combined is None:
            return {"loaders": list(self._pending)}
        return {"loaders": [d.state_dict() for d in combined.flattened if isinstance(d, _PositionedLoader)]}

    def check_state_dict(self, state: Any) -> list[str]:
        loaders = state.get("loaders") if isinstance(state, dict) else None
        if not (isinstance(loaders, list) and all(isinstance(s, dict) for s in loaders)):
            return ["not the positions of Lightning's training loaders"]
        return []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = list(state["loaders"])


class _FromStore(CheckpointIO):
    """The strategy's CheckpointIO, but for the checkpoint the session restored: loading it gives the
    state read (and verified) from the store; every other path is the original's."""

    def __init__(self, inner: CheckpointIO, state: _TrainerState) -> None:
        self._inner, self._state = inner, state

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self._state.loaded is not None and str(path) == self._state.restored_path:
            return self._state.loaded
        return self._inner.load_checkpoint(path, *args, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self._inner.save_checkpoint(checkpoint, path, storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self._inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self._inner.teardown()


class _PositionedLoader(FrameworkLoader):
    """The training DataLoader as Lightning iterates it (session/framework_loader.py). A loader with a
    length is fetched batch by batch, as the loop goes; one without is fetched one batch ahead
    (Lightning's prefetch, to know the last). Lightning keeps a loader with state_dict() and
    load_state_dict() as stateful: without them it would warn of an inexact mid-epoch resume."""

    def __init__(self, loader: DataLoader, rng: RngReads) -> None:
        try:
            len(loader)
            ahead = False
        except TypeError:
            ahead = True
        super().__init__(loader, ahead, rng)

    @property
    def worker_init_fn(self) -> Any:
        return self.loader.worker_init_fn

    @worker_init_fn.setter
    def worker_init_fn(self, fn: Any) -> None:  # Lightning's seed_everything(workers=True) sets it
        self.loader.worker_init_fn = fn

    def state_dict(self) -> dict[str, Any]:
        return self.saved_position()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.continue_from(state)


_OWN_KEY = "hydra_preempt"  # this module's part of the Lightning checkpoint


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


class _Boundaries(Callback):
    """The session's step boundaries in Lightning's loop, at the points it resumes from exactly: after
    an optimizer step within an epoch, at the batch's `on_train_batch_end`, or, when a validation runs
    after that batch, at its `on_validation_end`. After an epoch's last batch there is none (Lightning
    resumes from there with its epoch counted twice or its end-of-epoch hooks skipped): the steps made
    there count at the next boundary, where a stop asked for meanwhile is taken, one step later."""

    def __init__(self, session: Session, state: _TrainerState) -> None:
        self.session, self.state = session, state
        self._steps: Generator[int, None, None] | None = None
        self._global_step = 0
        self._at_validation_end = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        combined = trainer.fit_loop._combined_loader
        if combined is not None and len(combined.flattened) > 1:
            raise ConfigError(
                f"{len(combined.flattened)} training loaders at once (a CombinedLoader): hydra_preempt.lightning "
                "positions one; join them into one DataLoader"
            )
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is not None and not hasattr(fetcher, "prefetch_batches"):
            raise ConfigError(
                "a training_step that takes dataloader_iter is not positioned by hydra_preempt.lightning: "
                "take the batch as an argument"
            )
        restored = {k: torch.tensor(v) for k, v in self.state.callback_metrics.items()}
        trainer.callback_metrics.update({k: v for k, v in restored.items() if k not in trainer.callback_metrics})
        self._global_step = trainer.global_step
        estimated = float(trainer.estimated_stepping_batches)
        total = int(estimated) if math.isfinite(estimated) and estimated > 0 else 0  # max_epochs=-1: unknown
        self._steps = self.session.driven_steps(lambda: trainer.global_step, total)
        next(self._steps)  # the first step begins

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == self._global_step:
            return  # the batches of an accumulation before its optimizer step
        self._global_step = trainer.global_step
        epoch_loop, fetcher = trainer.fit_loop.epoch_loop, trainer.fit_loop._data_fetcher
        if epoch_loop.batch_progress.is_last_batch:
            return
        if fetcher is not None and epoch_loop._should_check_val_fx(fetcher):
            self._at_validation_end = True
            return
        self._boundary(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._at_validation_end and not trainer.sanity_checking:
            self._at_validation_end = False
            self._boundary(trainer)

    def _boundary(self, trainer: Trainer) -> None:
        if metrics := _scalars(trainer.callback_metrics):
            self.session.report(**metrics)
        assert self._steps is not None
        next(self._steps)  # ends the steps made since the last boundary: saves and stops (RunStopped) happen here

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None
