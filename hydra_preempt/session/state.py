"""What a checkpoint holds: the registered objects, every rank's own state and RNGs, and how it goes back.

The state tree of a checkpoint:
    {"objects": {name: state_dict of each shared object},
     "ranks":   [{"objects": {name: state_dict of each per-rank object}, "rng": {...}} per rank],
     "session": {"step": completed steps, "detector": the divergence detector's state}}

`StateRegistry` also knows whether a step has changed the state yet, which
decides whether an emergency checkpoint after an exception is consistent.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointMismatchError, ConfigError

log = logging.getLogger("hydra_preempt")


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and every CUDA device's generator state."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": [],
    }
    # Only read CUDA generators that exist already: touching them would
    # initialise CUDA in a process that never used it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    saved = state.get("torch_cuda") or []
    if not saved:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(saved):
        log.warning(
            "checkpoint holds the RNG state of %d CUDA device(s), this process sees %d: "
            "restoring the first %d; random streams on other devices start fresh",
            len(saved),
            available,
            min(available, len(saved)),
        )
    for i, s in enumerate(saved[:available]):
        torch.cuda.set_rng_state(s, i)


@dataclass
class StepStart:
    """What an emergency checkpoint needs from the boundary a step started at."""

    step: int
    fingerprint: tuple
    rng: dict
    copied: dict[str, Any]  # state_dict() of objects whose changes a fingerprint cannot see


class StateRegistry:
    """The objects registered with the session, and the state tree built from them."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.per_rank: set[str] = set()  # names registered with register_per_rank

    def register(self, per_rank: bool, **objects: Any) -> None:
        for name, obj in objects.items():
            if isinstance(obj, torch.Generator):
                obj = _GeneratorState(obj)
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise ConfigError(
                    f"cannot register {name!r}: {type(obj).__name__} has no state_dict()/load_state_dict()"
                )
            if name in self.objects:
                raise ConfigError(f"{name!r} is registered twice")
            self.objects[name] = obj
            if per_rank:
                self.per_rank.add(name)

    # -- the tree -------------------------------------------------------------------
    def rank_state(self, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        """This rank's own part: its per-rank objects and its RNGs."""
        return {"objects": {n: self.objects[n].state_dict() for n in self.per_rank}, "rng": rng or capture_rng()}

    def tree(self, step: int, ranks: list[dict[str, Any]], detector: dict | None) -> dict[str, Any]:
        shared = {name: obj.state_dict() for name, obj in self.objects.items() if name not in self.per_rank}
        return {"objects": shared, "ranks": ranks, "session": {"step": step, "detector": detector}}

    def load(self, tree: dict[str, Any], rank: int, world_size: int, where: str) -> None:
        """Load `tree` into the objects and this rank's RNGs; every check runs before anything is loaded."""
        if len(tree["ranks"]) != world_size:
            raise CheckpointMismatchError(
                f"{where} was saved by {len(tree['ranks'])} rank(s), this run has {world_size}"
            )
        own = tree["ranks"][rank]
        saved = {**tree["objects"], **own["objects"]}
        missing, unexpected = sorted(self.objects.keys() - saved.keys()), sorted(saved.keys() - self.objects.keys())
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{where} holds objects {sorted(saved)}, this run registered {sorted(self.objects)}"
                + (f"; not in the checkpoint: {missing}" if missing else "")
                + (f"; only in the checkpoint: {unexpected}" if unexpected else "")
            )
        problems = [p for name, obj in self.objects.items() for p in _mismatches(name, obj, saved[name])]
        if problems:
            raise CheckpointMismatchError(
                f"{where} does not fit this run's objects (nothing was loaded): " + "; ".join(problems)
            )
        for name, obj in self.objects.items():
            try:
                obj.load_state_dict(saved[name])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise CheckpointMismatchError(f"{where}: loading {name!r} failed: {e}") from None
        restore_rng(own["rng"])

    # -- emergency checkpoints --------------------------------------------------------
    def step_start(self, step: int) -> StepStart:
        """Remember the state a step starts from, cheaply: version counters, RNGs, copies of the rest."""
        copied = {n: copy.deepcopy(o.state_dict()) for n, o in self.objects.items() if not _checked_in_place(o)}
        return StepStart(step, self.fingerprint(), capture_rng(), copied)

    def unchanged_since(self, start: StepStart) -> bool:
        return start.fingerprint == self.fingerprint()

    def tree_at(self, start: StepStart, detector: dict | None) -> dict[str, Any]:
        """The single-rank tree of the state `start` was taken at; valid while `unchanged_since(start)`."""
        objects = {n: o.state_dict() if _checked_in_place(o) else start.copied[n] for n, o in self.objects.items()}
        shared = {n: s for n, s in objects.items() if n not in self.per_rank}
        own = {n: s for n, s in objects.items() if n in self.per_rank}
        return {
            "objects": shared,
            "ranks": [{"objects": own, "rng": start.rng}],
            "session": {"step": start.step, "detector": detector},
        }

    def fingerprint(self) -> tuple:
        """Version counters of every tensor a step updates in place: equal means unchanged."""
        parts: list = []
        for obj in self.objects.values():
            if isinstance(obj, torch.nn.Module):
                parts.extend(t._version for t in chain(obj.parameters(), obj.buffers()))
            elif isinstance(obj, torch.optim.Optimizer):
                parts.append(len(obj.state))
                for state in obj.state.values():
                    parts.extend(v._version if isinstance(v, torch.Tensor) else v for v in state.values())
            elif isinstance(obj, torch.amp.GradScaler):
                parts.extend(t._version if t is not None else None for t in (obj._scale, obj._growth_tracker))
        return tuple(parts)


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
                problems.append(
                    f"{name}.{key}: shape {tuple(saved[key].shape)} in the checkpoint, {tuple(current[key].shape)} in this model"
                )
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
