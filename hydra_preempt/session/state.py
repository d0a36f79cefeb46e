"""What a checkpoint holds: the registered objects, every rank's own state and RNGs, and how it goes back.

The state tree of a checkpoint (written by rank 0):
    {"objects": {name: state_dict of each shared object},
     "ranks":   [{"objects": {name: state_dict of each per-rank object}, "rng": {...}} per rank],
     "session": {"step": completed steps, "detector": the divergence detector's state}}
Sharded objects (a module whose parameters are DTensors, as with FSDP2 or
tensor parallelism, and its optimizer) are not in the tree: every rank
writes its own shards (checkpoint/sharded.py), taken and set with
torch.distributed.checkpoint.state_dict, never gathered.

Loading is planned in full before anything is loaded: every check runs
first, then the objects are set.

At another world size than the checkpoint's: sharded objects are resharded
exactly, shared objects load as they are, each rank's RNGs come from the
checkpoint's rank of the same number or, beyond it, are seeded from (step,
rank); such a resume is exact in its parameters but its random streams
differ from an uninterrupted run's (logged). Per-rank objects (a data
shard's position) have no meaning at another world size: refused.

`StateRegistry` also knows whether a step has changed the state yet, which
decides whether an emergency checkpoint after an exception is consistent.
"""

from __future__ import annotations

import array
import collections
import copy
import ctypes
import logging
import random
import struct
import sys
import time
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader

from ..data import ResumableLoader
from ..errors import CheckpointMismatchError, CheckpointReadError, ConfigError
from ..loader_position import LoaderPosition

if TYPE_CHECKING:  # torch.distributed.checkpoint is imported when a run has sharded state (_dcp_state_dict)
    from torch.distributed.checkpoint.metadata import Metadata

log = logging.getLogger("hydra_preempt")


def capture_rng(python_state: Any = None, numpy_state: Any = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU and every CUDA device's generator state (`python_state` and
    `numpy_state`, when given, are what random.getstate() and np.random.get_state() return now)."""
    state: dict[str, Any] = {
        "python": random.getstate() if python_state is None else python_state,
        "numpy": np.random.get_state() if numpy_state is None else numpy_state,
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": [],
    }
    # Only read CUDA generators that exist already: touching them would initialise CUDA in a
    # process that never used it (initialised implies available: is_available() costs ~20 us).
    if torch.cuda.is_initialized():
        state["torch_cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


class RawWords:
    """The raw state words of a generator at a fixed address, compared with the last ones seen.

    Without allocating: after a step's tensor work, the first large block (~1 KB or more) anyone
    asks malloc for costs ~100 us more than the next (glibc then consolidates the small blocks the
    step freed), and a step start should not be the one to pay it. (So the words are copied
    through a memoryview: assigning to a bytearray's slice copies the source first.) The owner
    keeps the generator alive.
    """

    def __init__(self, address: int, size: int) -> None:
        self._words = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
        self._seen, self._now = bytearray(size), bytearray(size)
        self._seen_view, self._now_view = memoryview(self._seen), memoryview(self._now)
        self._first = True

    def moved(self) -> bool:
        """Whether the words differ from those at the previous call (True at the first)."""
        self._now_view[:] = self._words
        if self._now == self._seen and not self._first:
            return False
        self._seen, self._now = self._now, self._seen
        self._seen_view, self._now_view = self._now_view, self._seen_view
        self._first = False
        return True


@dataclass(frozen=True)
class RngReads:
    """What reads the generators' states, Python's and NumPy's through a registry's watches (read only
    when they moved), without a reference to the registry: a loader position holds it, and the loader's
    persistent workers end when the run lets go of the loader, not at a later garbage collection."""

    python: PythonRngWatch
    numpy: NumpyRngWatch

    def global_states(self) -> tuple[torch.Tensor, Any, Any]:
        """torch's CPU, Python's and NumPy's global generator states (a LoaderPosition's reader)."""
        return torch.get_rng_state(), self.python.state(), self.numpy.state()

    def capture(self) -> dict[str, Any]:
        """`capture_rng()`: every generator, CUDA's included."""
        return capture_rng(self.python.state(), self.numpy.state())


class NumpyRngWatch:
    """NumPy's global generator state, read again only when it moved.

    `np.random.get_state()` costs ~80 us (building the key array and tuple), more than everything
    else an emergency checkpoint's bookkeeping does at a step start, while most training loops never
    touch NumPy's global generator after setup. Its raw MT19937 words (2.5 KB) are compared instead
    (RawWords, at the address the generator object gives; `set_bit_generator()` replaces the
    object); unchanged words mean an unchanged state, except for the cached second Gaussian, which
    is consumed without moving the words: a state holding one is read again every time. A generator
    other than MT19937 (whose state is smaller) is read every time.
    """

    _SIZE = 624 * 4 + 4  # NumPy's C struct: uint32_t key[624]; int pos

    def __init__(self) -> None:
        self._state: Any = None
        self._generator: Any = None  # the bit generator behind np.random.*, kept alive while watched
        self._words: RawWords | None = None

    def state(self) -> Any:
        words = self._watched_words()
        if words is None or words.moved() or self._state is None or self._state[3]:  # [3]: has_gauss
            self._state = np.random.get_state()
        return self._state

    def _watched_words(self) -> RawWords | None:
        try:  # the legacy global RandomState; seed() and set_state() change its generator in place
            generator = np.random.mtrand._rand._bit_generator
        except AttributeError:  # another NumPy layout: no shortcut
            return None
        if generator is not self._generator:
            self._generator = generator
            self._words = (
                RawWords(generator.ctypes.state_address, self._SIZE) if type(generator) is np.random.MT19937 else None
            )
        return self._words


class PythonRngWatch:
    """The state of Python's `random` module functions, read again only when it moved.

    `random.getstate()` builds a tuple of 625 ints (~12 us, ~100 us as the first large allocation
    after a step's tensor work). Its parts are the Mersenne Twister's words and index, which
    CPython keeps in the C struct behind `random.Random` (`int index; uint32_t state[624]` after the
    object header), and `gauss_next`, a cached Gaussian kept as an attribute. The words are
    compared (RawWords, at the object's address), `gauss_next` by identity. The layout is
    CPython's, not a public API: it is checked against getstate() once per generator object, and
    where it does not match (another interpreter or build), or where random.getstate is not
    random.Random's own, the state is read every time.
    """

    _LAYOUT = "=i624I"  # index, then the words; getstate() gives (*words, index)

    def __init__(self) -> None:
        self._state: Any = None
        self._generator: Any = None  # the random.Random behind random.*, kept alive while watched
        self._words: RawWords | None = None

    def state(self) -> Any:
        words = self._watched_words()
        if words is None or words.moved() or self._state is None or self._generator.gauss_next is not self._state[2]:
            self._state = random.getstate()
        return self._state

    def _watched_words(self) -> RawWords | None:
        getstate = random.getstate
        generator = getattr(getstate, "__self__", None)
        if type(generator) is not random.Random or getattr(getstate, "__func__", None) is not random.Random.getstate:
            self._generator = self._words = None
            return None
        if generator is not self._generator:
            self._generator, self._words = generator, _python_rng_words(generator, self._LAYOUT)
        return self._words


def _python_rng_words(generator: random.Random, layout: str) -> RawWords | None:
    """The words and index of `generator`, if CPython's layout is the one getstate() shows."""
    header, size = object.__basicsize__, struct.calcsize(layout)
    if random.Random.__mro__[1].__basicsize__ < header + size:  # _random.Random, the C type
        return None
    address = id(generator) + header
    index, *words = struct.unpack(layout, ctypes.string_at(address, size))
    if tuple(words) + (index,) != random.Random.getstate(generator)[1]:
        return None
    return RawWords(address, size)


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


def check_tree(tree: Any, step: int, detector: Any = None) -> None:
    """Raise ValueError unless `tree` has the form `StateRegistry.tree` writes, for `step`.

    What the session itself put there is checked in full before anything is loaded: the envelope,
    the step (against the manifest's), every rank's RNG states (set on throwaway generators) and,
    given a fresh `detector`, the divergence detector's state (loaded into it). The registered
    objects' own states are compared with the live objects by `StateRegistry.check`.
    """
    if not isinstance(tree, dict) or not {"objects", "ranks", "session"} <= tree.keys():
        raise ValueError("the state has no objects, ranks or session")
    session, ranks = tree["session"], tree["ranks"]
    if not isinstance(tree["objects"], dict) or not isinstance(session, dict):
        raise ValueError("objects and session must be mappings")
    if session.get("step") != step or isinstance(session.get("step"), bool):
        raise ValueError(f"the state is of step {session.get('step')!r:.40}, its manifest says {step}")
    if not isinstance(ranks, list) or not ranks:
        raise ValueError("the state holds no rank")
    for rank, own in enumerate(ranks):
        if not (isinstance(own, dict) and isinstance(own.get("objects"), dict) and isinstance(own.get("rng"), dict)):
            raise ValueError(f"rank {rank}'s state has no objects or rng")
        try:
            _check_rng(own["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise ValueError(f"rank {rank}'s RNG state is not valid ({type(e).__name__}: {e})"[:300]) from None
    saved_detector = session.get("detector")
    if detector is not None and saved_detector is not None:
        try:
            detector.load_state_dict(saved_detector)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"the divergence detector's state is not valid ({type(e).__name__})") from None


def _check_rng(state: dict[str, Any]) -> None:
    """Set each saved generator state on a throwaway generator: what restore_rng would reject, raises."""
    random.Random().setstate(state["python"])
    np.random.RandomState().set_state(state["numpy"])
    torch.Generator().set_state(state["torch_cpu"])
    cuda = state.get("torch_cuda") or []
    if not isinstance(cuda, list) or not all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in cuda
    ):
        raise ValueError("torch_cuda must be a list of byte tensors")


@dataclass
class StepStart:
    """What an emergency checkpoint needs from the boundary a step started at."""

    step: int
    fingerprint: tuple
    rng: dict
    copied: dict[str, Any]  # state_dict() of objects whose changes a fingerprint cannot see, tensors shared
    tensors: tuple[tuple[torch.Tensor, int], ...] = ()  # those shared tensors and their version counters
    uncopied: tuple[str, ...] = ()  # objects too large to copy at every step start: their state there is unknown


class StateRegistry:
    """The objects registered with the session, and the state tree built from them."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.per_rank: set[str] = set()  # names registered with register_per_rank
        self.owners: dict[str, Any] = {}  # module or optimizer name -> the module its state functions take
        self.sharded: set[str] = set()  # names of objects whose state is sharded (DTensor)
        self._optimizer_steps = 0  # optimizer.step() calls begun (a step pre-hook on each registered optimizer)
        self._hooks: list[Any] = []  # those hooks' handles, removed by release()
        self._watched: list[torch.Tensor] | None = None  # tensors whose version counters the fingerprint reads
        self._uncopied: frozenset[str] | None = None  # objects step_start does not copy, chosen at the first step
        self.rng_reads = RngReads(PythonRngWatch(), NumpyRngWatch())
        self.before_update: Callable[[], None] | None = None  # called before each registered optimizer's step()

    def register(self, per_rank: bool, **objects: Any) -> None:
        for name, obj in objects.items():
            if isinstance(obj, torch.Generator):
                obj = _GeneratorState(obj)
            elif isinstance(obj, DataLoader):  # torch's, or torchdata's StatefulDataLoader
                if any(p.loader is obj for p in self.positions()):
                    raise ConfigError(f"{name!r}: this DataLoader is registered twice")
                # its position records the global generators' states at each step start: read as ours are,
                # Python's and NumPy's only when they moved (no reference to this registry: the loader's
                # persistent workers end when the run lets go of it, not at a later garbage collection)
                obj = LoaderPosition(obj, name, self.rng_reads.global_states)
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise ConfigError(
                    f"cannot register {name!r}: {type(obj).__name__} has no state_dict()/load_state_dict()"
                )
            if name in self.objects:
                raise ConfigError(f"{name!r} is registered twice")
            self.objects[name] = obj
            if per_rank:
                self.per_rank.add(name)
            if isinstance(obj, torch.optim.Optimizer):
                self._hooks.append(obj.register_step_pre_hook(self._count_optimizer_step))
        self._find_sharded()
        self._watched = None
        self._uncopied = None

    def release(self) -> None:
        """The run ended: remove the hooks on the optimizers. Each holds this registry, which holds the
        optimizer: a cycle that only the cyclic garbage collector frees, late, with everything the
        registry reaches, and a DataLoader's persistent workers freed that way take 5 s each to end
        (their queues are finalized before the iterator's __del__ asks them to stop)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.before_update = None
        for position in self.positions():
            position.release()

    def positions(self) -> list[LoaderPosition]:
        """The registered DataLoaders' positions, in the order they were registered."""
        return [o for o in self.objects.values() if isinstance(o, LoaderPosition)]

    def position_of(self, loader: Any) -> LoaderPosition | None:
        return next((p for p in self.positions() if p.loader is loader), None)

    def holds_data_position(self) -> bool:
        """Whether a registered object says where the data stand: a DataLoader, a ResumableLoader, or
        any object registered as `data`."""
        return "data" in self.objects or any(
            isinstance(o, (LoaderPosition, ResumableLoader)) for o in self.objects.values()
        )

    def _count_optimizer_step(self, *_: Any) -> None:
        self._optimizer_steps += 1
        if self.before_update is not None:
            self.before_update()

    def _find_sharded(self) -> None:
        """Which modules and optimizers are sharded; refuse what cannot be saved consistently."""
        modules = {n: o for n, o in self.objects.items() if isinstance(o, torch.nn.Module)}
        self.owners = dict(modules)  # name -> the module whose state_dict functions take it
        for name, obj in self.objects.items():
            if isinstance(obj, torch.optim.Optimizer):
                ids = {id(p) for group in obj.param_groups for p in group["params"]}
                owner = next((m for m in modules.values() if ids <= {id(p) for p in m.parameters()}), None)
                if owner is not None:
                    self.owners[name] = owner
                elif _has_dtensor(p for group in obj.param_groups for p in group["params"]):
                    raise ConfigError(
                        f"cannot register {name!r}: its parameters are sharded (DTensor); register the module "
                        "that owns all of them too (in the same register() call or before)"
                    )
        self.sharded = {n for n, o in self.objects.items() if n in self.owners and _is_sharded(o)}
        if bad := sorted(self.per_rank & self.sharded):
            raise ConfigError(
                f"{', '.join(bad)}: sharded state is saved by every rank already; use register(), not register_per_rank()"
            )

    def sharded_state(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """This rank's part of each sharded object (or of `names`), as torch.distributed.checkpoint takes it."""
        dcp_state_dict, state = _dcp_state_dict(), {}
        for name in sorted(self.sharded if names is None else names):
            obj, module = self.objects[name], self.owners[name]
            state[name] = (
                dcp_state_dict.get_model_state_dict(obj)
                if obj is module
                else dcp_state_dict.get_optimizer_state_dict(module, obj)
            )
        return state

    # -- the tree -------------------------------------------------------------------
    def rank_state(self, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        """This rank's own part: its per-rank objects and its RNGs."""
        return {"objects": {n: self.objects[n].state_dict() for n in self.per_rank}, "rng": rng or self.capture_rng()}

    def capture_rng(self) -> dict[str, Any]:
        """`capture_rng()`, Python's and NumPy's generators read only when they moved."""
        return self.rng_reads.capture()

    def tree(self, step: int, ranks: list[dict[str, Any]], detector: dict | None) -> dict[str, Any]:
        shared = {
            name: obj.state_dict()
            for name, obj in self.objects.items()
            if name not in self.per_rank and name not in self.sharded
        }
        return {"objects": shared, "ranks": ranks, "session": {"step": step, "detector": detector}}

    def check(
        self, tree: dict[str, Any], sharded: tuple[str, ...], rank: int, world_size: int, where: str, cast: bool = False
    ) -> None:
        """Raise CheckpointMismatchError if the checkpoint cannot be loaded into this run (nothing is loaded);
        `cast` (checkpoint.cast_dtype): a module's tensors of another dtype are loaded cast."""
        saved_ranks = len(tree["ranks"])
        if saved_ranks != world_size and self.per_rank:
            raise CheckpointMismatchError(
                f"{where} was saved by {saved_ranks} rank(s), this run has {world_size}: the per-rank state of "
                f"{', '.join(sorted(self.per_rank))} has no meaning at another world size (nothing was loaded)"
            )
        own = tree["ranks"][rank] if rank < saved_ranks else {"objects": {}}
        saved = {**tree["objects"], **own["objects"], **dict.fromkeys(sharded)}
        missing, unexpected = sorted(self.objects.keys() - saved.keys()), sorted(saved.keys() - self.objects.keys())
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{where} holds objects {sorted(saved)}, this run registered {sorted(self.objects)}"
                + (f"; not in the checkpoint: {missing}" if missing else "")
                + (f"; only in the checkpoint: {unexpected}" if unexpected else "")
            )
        if unsharded := sorted(self.sharded - set(sharded)):
            raise CheckpointMismatchError(
                f"{where} holds {', '.join(unsharded)} unsharded (saved without FSDP/DTensor); this run shards "
                "it: resume once at the world size and parallelism it was saved with"
            )
        if orphans := sorted(n for n in sharded if n not in self.owners):
            raise CheckpointMismatchError(
                f"{where}: {', '.join(orphans)} is sharded state of a module not registered here"
            )
        problems = [
            p
            for name, obj in self.objects.items()
            if name not in sharded
            for p in _mismatches(name, obj, saved[name], cast)
        ]
        if problems:
            raise CheckpointMismatchError(
                f"{where} does not fit this run's objects (nothing was loaded): " + "; ".join(problems)
            )

    def sharded_template(self, names: Iterable[str]) -> dict[str, Any]:
        """Copies of this rank's part of `names` to read a checkpoint into, so that a failed read changes nothing."""
        return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, self.sharded_state(names))

    def check_shards(self, template: dict[str, Any], metadata: Metadata, where: str, cast: bool = False) -> None:
        """Every key of this run's sharded state is in the checkpoint, with the same global shape and,
        unless `cast` (checkpoint.cast_dtype), the same dtype: a float32 checkpoint loaded into a
        bfloat16 model is no exact resume."""
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        flat, _ = flatten_state_dict(template)
        saved = metadata.state_dict_metadata
        problems = [f"{key}: not in the checkpoint" for key in sorted(flat.keys() - saved.keys())]
        problems += [f"{key}: only in the checkpoint" for key in sorted(saved.keys() - flat.keys())]
        casts: list[str] = []
        for key in sorted(flat.keys() & saved.keys()):
            value, entry = flat[key], saved[key]
            if isinstance(value, torch.Tensor) != isinstance(entry, TensorStorageMetadata):
                problems.append(f"{key}: a tensor in one of the checkpoint and this run, not in the other")
            elif isinstance(entry, TensorStorageMetadata) and tuple(value.size()) != tuple(entry.size):
                problems.append(
                    f"{key}: shape {tuple(entry.size)} in the checkpoint, {tuple(value.size())} in this run"
                )
            elif isinstance(entry, TensorStorageMetadata) and not cast and value.dtype != entry.properties.dtype:
                casts.append(f"{key} ({entry.properties.dtype} in the checkpoint, {value.dtype} in this run)")
        if casts:
            problems.append("another dtype (checkpoint.cast_dtype: true loads them cast): " + ", ".join(casts))
        if problems:
            raise CheckpointMismatchError(
                f"{where}: the sharded state does not fit this run (nothing was loaded): " + "; ".join(problems)
            )

    def load(self, tree: dict[str, Any], shards: dict[str, Any], rank: int, world_size: int, where: str) -> None:
        """Set every object from a checked checkpoint: the tree's objects, the shards, this rank's RNGs."""
        saved_ranks = len(tree["ranks"])
        own = tree["ranks"][rank] if rank < saved_ranks else None
        saved = {**tree["objects"], **(own["objects"] if own else {})}
        for name, obj in self.objects.items():
            try:
                if name not in shards:
                    obj.load_state_dict(saved[name])
                elif self.owners[name] is obj:
                    _dcp_state_dict().set_model_state_dict(obj, shards[name])
                else:
                    _dcp_state_dict().set_optimizer_state_dict(self.owners[name], obj, shards[name])
            except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as e:
                raise CheckpointReadError(
                    f"{where}: loading {name!r} failed ({e}) after the objects before it were set: "
                    "nothing is saved from this state"
                ) from None
        if saved_ranks != world_size:
            log.warning(
                "%s was saved by %d rank(s), this run has %d: parameters and optimizer state are resharded exactly; "
                "the random streams of rank %d %s, so the trajectory will differ from an uninterrupted run",
                where,
                saved_ranks,
                world_size,
                rank,
                "continue the checkpoint's rank of the same number" if own else "are seeded from (step, rank)",
            )
        try:
            if own is not None:
                restore_rng(own["rng"])
            else:
                seed_rng(int(tree["session"]["step"]), rank)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointReadError(f"{where}: setting the random generators failed ({e})") from None

    # -- emergency checkpoints --------------------------------------------------------
    def step_start(self, step: int) -> StepStart:
        """Remember the state a step starts from, cheaply: version counters, RNGs, and a copy of the
        state_dict() of every other object (an EMA, a replay buffer) in which each tensor is the
        object's own, not copied, with its version counter: a 400 MB buffer costs no copy per step.
        An in-place change of such a tensor (`add_`, `copy_`, under no_grad or not) moves its counter and
        the step counts as changed (unchanged_since); a tensor replaced by a new one leaves the old
        one, the step's start, intact. (A change through `.data` bypasses the counter.)

        What is not a tensor (a NumPy array, a list) has no counter and is copied. An object whose copy
        would cost more than COPY_LIMIT_NS a step (estimated at the first step, and again after a copy
        that took 5 times that, as a list that grows does) is no longer copied, with one warning: the
        state a step started from is then unknown (StepStart.uncopied)."""
        first = self._uncopied is None
        uncopied, grown = set(self._uncopied or ()), set()
        copied: dict[str, Any] = {}
        tensors: list[torch.Tensor] = []
        for name, obj in self.objects.items():
            if _checked_in_place(obj) or name in uncopied:
                continue
            state = obj.state_dict()
            if getattr(obj, "state_dict_is_fresh", False):  # made anew at each call, never changed later
                copied[name] = state
                continue
            if first and (cost_ns := copy_cost_ns(state)) > COPY_LIMIT_NS:
                uncopied.add(name)
                _warn_uncopied(name, cost_ns / 1e6)
                continue
            shared = _tensors_in(state)
            began = time.perf_counter_ns()
            copied[name] = copy.deepcopy(state, {id(t): t for t in shared})  # the structure; tensors as they are
            tensors.extend(shared)
            # a slow copy is estimated again: a busy host makes a cheap copy slow too, the estimate is not timed
            if time.perf_counter_ns() - began > 5 * COPY_LIMIT_NS and (cost_ns := copy_cost_ns(state)) > COPY_LIMIT_NS:
                grown.add(name)  # from the next step: this one's start is copied
                _warn_uncopied(name, cost_ns / 1e6)
        self._uncopied = frozenset(uncopied | grown)
        versions = tuple((t, t._version) for t in tensors)
        return StepStart(step, self.fingerprint(), self.capture_rng(), copied, versions, tuple(sorted(uncopied)))

    def unchanged_since(self, start: StepStart) -> bool:
        return start.fingerprint == self.fingerprint() and all(t._version == v for t, v in start.tensors)

    def can_return_to(self, start: StepStart) -> bool:
        """tree_at(start) holds the state the step started from: nothing changed, and every object was copied."""
        return not start.uncopied and self.unchanged_since(start)

    def tree_at(self, start: StepStart, detector: dict | None) -> dict[str, Any]:
        """The single-rank tree of the state `start` was taken at; valid while `can_return_to(start)`."""
        objects = {
            n: o.state_dict() if _checked_in_place(o) else start.copied[n]
            for n, o in self.objects.items()
            if n not in self.sharded
        }
        shared = {n: s for n, s in objects.items() if n not in self.per_rank}
        own = {n: s for n, s in objects.items() if n in self.per_rank}
        return {
            "objects": shared,
            "ranks": [{"objects": own, "rng": start.rng}],
            "session": {"step": start.step, "detector": detector},
        }

    def fingerprint(self) -> tuple:
        """Equal means unchanged: optimizer steps begun, and the version counters of what else a step
        may update in place.

        Walking every parameter and optimizer tensor costs ~0.5 us each, every step (a model of
        thousands of tensors would pay milliseconds). A torch.optim optimizer's parameters and
        state change only in its step(), which a hook counts; so only the rest is watched: module
        buffers (batch-norm statistics change in forward), parameters no registered torch.optim
        optimizer owns (updated by hand, or by another optimizer class such as SAM, whose
        first_step() perturbs them), a GradScaler's scale. The list is built at the first step:
        a buffer later replaced by a new tensor (not updated in place) is not seen.
        """
        if self._watched is None:
            self._watched = self._tensors_changed_outside_optimizers()
        scalers = [o for o in self.objects.values() if isinstance(o, torch.amp.GradScaler)]
        return (
            self._optimizer_steps,
            *[t._version for t in self._watched],
            *[t._version if t is not None else None for o in scalers for t in (o._scale, o._growth_tracker)],
        )

    def _stepped_optimizers(self) -> list[torch.optim.Optimizer]:
        """torch's own optimizers change their parameters and state in step() only; others (SAM's
        first_step(), ...) may change them elsewhere."""
        return [
            o
            for o in self.objects.values()
            if isinstance(o, torch.optim.Optimizer) and type(o).__module__.startswith("torch.optim")
        ]

    def changed_only_by_optimizer_steps(self) -> frozenset[int]:
        """The data_ptr() of the CPU tensors that change only in a registered optimizer's step(): the
        parameters and state of torch's own optimizers (a background save copies them while the next
        step computes, and the optimizer's step pre-hook waits for that copy: before_update)."""
        return frozenset(
            t.data_ptr()
            for o in self._stepped_optimizers()
            for t in chain(
                (p for group in o.param_groups for p in group["params"]),
                (v for state in o.state.values() for v in state.values() if isinstance(v, torch.Tensor)),
            )
            if t.device.type == "cpu"
        )

    def _tensors_changed_outside_optimizers(self) -> list[torch.Tensor]:
        stepped = {id(p) for o in self._stepped_optimizers() for group in o.param_groups for p in group["params"]}
        watched: list[torch.Tensor] = []
        for obj in self.objects.values():
            if isinstance(obj, torch.nn.Module):
                watched.extend(chain(obj.buffers(), (p for p in obj.parameters() if id(p) not in stepped)))
        return watched  # a GradScaler's tensors are created lazily: read each time (fingerprint)


def seed_rng(step: int, rank: int) -> None:
    """Random streams for a rank that has none in the checkpoint: derived from (step, rank) alone."""
    seed = (step * 1_000_003 + rank * 7_919 + 1) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


def _has_dtensor(tensors: Iterable[Any]) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before its module is imported
    return dtensor is not None and any(isinstance(t, dtensor.DTensor) for t in tensors)


def _dcp_state_dict() -> Any:
    """torch.distributed.checkpoint.state_dict, imported when a run has sharded state (see
    layout.ShardedFormatError for why)."""
    import torch.distributed.checkpoint.state_dict as dcp_state_dict

    return dcp_state_dict


def _is_sharded(obj: Any) -> bool:
    if isinstance(obj, torch.nn.Module):
        return _has_dtensor(obj.parameters())
    return _has_dtensor(p for group in obj.param_groups for p in group["params"])


def _tensors_in(state: Any) -> list[torch.Tensor]:
    """The tensors in a state_dict()'s dicts, lists and tuples (not inside other objects: those are copied)."""
    found: list[torch.Tensor] = []
    pending = [state]
    while pending:
        value = pending.pop()
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
    return found


# The most a step start's copy of the objects' non-tensor state may cost (estimated: copy_cost_ns):
# about 25 MB of NumPy arrays, or 10,000 numbers in lists. Beyond it an object is not copied.
COPY_LIMIT_NS = 2_000_000


def _warn_uncopied(name: str, ms: float) -> None:
    log.warning(
        "%r: its state_dict() holds values without version counters (NumPy arrays, lists, ...) that would take "
        "about %.0f ms to copy at a step start, so they are no longer copied: while it is registered, a step that an "
        "exception cuts short saves no emergency checkpoint (the last checkpoint stands; saves at step "
        "boundaries are exact as ever). Tensors in a state_dict() are shared, not copied: hold large state "
        "in them to keep emergency checkpoints",
        name,
        ms,
    )


def copy_cost_ns(state: Any) -> float:
    """About how long copy.deepcopy(state) takes with its tensors shared, in ns (measured on a 2-core
    x86 machine: 0.08 ns a byte of an array's buffer, 500 ns a container or object, 170 ns any other
    value). It walks the state once, as a copy would."""
    cost = 0.0
    seen: set[int] = set()
    pending = [state]
    while pending:
        value = pending.pop()
        if id(value) in seen or isinstance(value, torch.Tensor):
            continue
        seen.add(id(value))
        if isinstance(value, np.ndarray):
            cost += 500 + (value.size * 170 if value.dtype.hasobject else value.nbytes * 0.08)
        elif isinstance(value, (bytearray, array.array, memoryview)):
            cost += 500 + memoryview(value).nbytes * 0.08
        elif isinstance(value, dict):
            cost += 500
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset, collections.deque)):
            cost += 500
            pending.extend(value)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            cost += 500
            pending.extend(vars(value).values())
        else:
            cost += 170
    return cost


def _checked_in_place(obj: Any) -> bool:
    return isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler))


def _mismatches(name: str, obj: Any, saved: Any, cast: bool = False) -> list[str]:
    """Why `saved` cannot be loaded into `obj`, checked before anything is loaded. An object may say
    why itself, with a `check_state_dict(state) -> list[str]` method (ResumableLoader does)."""
    if callable(check := getattr(obj, "check_state_dict", None)):
        return [f"{name}: {problem}" for problem in check(saved)]
    if isinstance(obj, torch.nn.Module):
        return module_mismatches(name, obj, saved, cast)
    if isinstance(obj, torch.optim.Optimizer):
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not (
            isinstance(saved, dict)
            and isinstance(saved.get("state"), dict)
            and isinstance(groups, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
        ):
            return [f"{name}: the checkpoint holds no optimizer state dict (state and param_groups)"]
        mine, theirs = [len(g["params"]) for g in obj.param_groups], [len(g["params"]) for g in groups]
        if mine != theirs:
            return [f"{name}: parameter groups of sizes {theirs} in the checkpoint, {mine} in this optimizer"]
    return []


def module_mismatches(name: str, module: torch.nn.Module, saved: Any, cast: bool = False) -> list[str]:
    """Why `saved` is not a state dict of `module`: keys missing or unexpected, other shapes and, unless
    `cast` (checkpoint.cast_dtype), other dtypes (a float32 checkpoint in a bfloat16 model is no exact
    resume). Each list names a few and counts the rest: another model differs in every tensor."""
    if not (isinstance(saved, dict) and all(isinstance(k, str) for k in saved)):
        return [f"{name}: the checkpoint holds {type(saved).__name__}, not a module's state dict"]
    current = module.state_dict()
    problems = []
    if missing := sorted(current.keys() - saved.keys()):
        problems.append(f"{name}: keys missing from the checkpoint: {_some(missing)}")
    if unexpected := sorted(saved.keys() - current.keys()):
        problems.append(f"{name}: unexpected keys in the checkpoint: {_some(unexpected)}")
    shapes: list[str] = []
    casts: list[str] = []
    for key in sorted(current.keys() & saved.keys()):
        if isinstance(saved[key], torch.Tensor) and tuple(saved[key].shape) != tuple(current[key].shape):
            shapes.append(
                f"{name}.{key}: shape {tuple(saved[key].shape)} in the checkpoint, {tuple(current[key].shape)} in this model"
            )
        elif isinstance(saved[key], torch.Tensor) and not cast and saved[key].dtype != current[key].dtype:
            casts.append(f"{name}.{key} ({saved[key].dtype} in the checkpoint, {current[key].dtype} in this model)")
    problems += shapes[:_SHOWN] + (
        [f"{len(shapes) - _SHOWN} more tensors of another shape"] if len(shapes) > _SHOWN else []
    )
    if casts:
        problems.append("another dtype (checkpoint.cast_dtype: true loads them cast): " + _some(casts))
    return problems


_SHOWN = 4  # names in each list of a refusal: another model differs in every tensor, a line of kilobytes


def _some(items: list[str]) -> str:
    """The first few of `items`, and how many more: a one-line refusal stays readable."""
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


class _GeneratorState:
    """Lets a torch.Generator be registered like any object with a state dict."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])
