"""Exact positions in standard data loaders: torch's DataLoader and torchdata's StatefulDataLoader.

A loader registered with the session (`session.register(data=loader)`) and
iterated with `session.batches(loader)` continues after `restore()` at the
exact next batch, mid-epoch, and later epochs follow as in an uninterrupted
run. The session registers a `LoaderPosition` in the loader's place.

What an uninterrupted run draws, a resumed one draws alike. Making a
DataLoader iterator draws its workers' base seed from `loader.generator` (or
the global CPU generator), and a RandomSampler without a generator draws its
permutation's seed from the global generator when the pass begins. So the
state of every generator the loader draws from is recorded before each pass
begins (`iter()`); a resumed pass is made again from those states, its
sampler advanced past the batches already used at the index level (no batch
is fetched, no worker runs), and then every generator is set to the state
the checkpoint holds. Persistent workers are made again as the saved run made
them, with the same base seed, fetching nothing.

torchdata's StatefulDataLoader positions itself (its own state_dict); its
resumed iterator would draw a base seed the saved run did not, so the
generators are kept as the checkpoint holds them across that `iter()`.

Not positioned: random draws inside worker processes (augmentations that use
torch's or NumPy's generator in `__getitem__` with `num_workers > 0`) follow
the workers' own streams, which a resumed pass starts afresh; seed such draws
from the sample index for exactness. An IterableDataset cannot be positioned
by a plain DataLoader and is refused.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .errors import ConfigError

_END = object()


class _SkippingIterator:
    """An index sampler's iterator that first passes over `skip` batches of indices (fetching nothing)."""

    def __init__(self, inner: Iterator[Any], skip: int) -> None:
        self.inner, self.skip = inner, skip

    def skip_now(self) -> None:
        while self.skip:
            self.skip -= 1
            if next(self.inner, _END) is _END:
                self.skip = 0

    def __iter__(self) -> _SkippingIterator:
        return self

    def __next__(self) -> Any:
        self.skip_now()
        return next(self.inner)


class _SkippingSampler:
    """Stands in for a loader's index sampler while a resumed pass is made; lazy, as the sampler is."""

    def __init__(self, sampler: Any, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> _SkippingIterator:
        return _SkippingIterator(iter(self.sampler), self.skip)

    def __len__(self) -> int:
        return len(self.sampler)


class LoaderPosition:
    """The position of a DataLoader (or StatefulDataLoader): passes begun, batches handed out of the
    current one, and the generator states its current pass began from. See the module's text."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.stateful = callable(getattr(loader, "state_dict", None)) and callable(
            getattr(loader, "load_state_dict", None)
        )
        if isinstance(loader.dataset, IterableDataset) and not (
            self.stateful and callable(getattr(loader.dataset, "state_dict", None))
        ):
            raise ConfigError(
                f"cannot position a DataLoader over {type(loader.dataset).__name__}, an IterableDataset without "
                "state: a resumed run would see other data; use a map-style Dataset, or torchdata's "
                "StatefulDataLoader over a dataset with state_dict()/load_state_dict()"
            )
        self.passes = 0  # iter() calls made through iterate()
        self.yielded = 0  # batches handed out by the current pass
        self.exhausted = False  # the current pass ended
        self._before_pass: dict[str, Any] | None = None  # generator states the current pass began from
        self._before_workers: dict[str, Any] | None = None  # persistent workers: states they were made from
        self._workers_pass = 0  # ... and the pass that made them
        self._resuming = False  # a loaded position, applied at the next iterate()
        self._at_save: dict[str, Any] | None = None  # generator states of the checkpoint (a loaded position)

    # -- generators --------------------------------------------------------------
    def _generators(self) -> list[torch.Generator]:
        """The generators this loader draws from, besides the global one: its own, its sampler's."""
        found: list[torch.Generator] = []
        sampler = getattr(self.loader, "sampler", None)
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        for holder in (self.loader, sampler, getattr(batch_sampler, "sampler", None), batch_sampler):
            g = getattr(holder, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
        return found

    def _rng(self) -> dict[str, Any]:
        """The states of every generator a pass may draw from: torch's, Python's and NumPy's global ones
        (a custom sampler may shuffle with `random`), the loader's and its sampler's."""
        return {
            "cpu": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "generators": [g.get_state() for g in self._generators()],
        }

    def _set_rng(self, states: dict[str, Any]) -> None:
        torch.set_rng_state(states["cpu"])
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        for g, s in zip(self._generators(), states["generators"]):
            g.set_state(s)

    # -- passes ------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The pass to run next, or the one in progress (counted from 0)."""
        return self.passes - 1 if self.passes and not self.exhausted else self.passes

    def iterate(self) -> Iterator[Any]:
        """One pass over the loader; after a load, the rest of the pass in progress, if one was."""
        if self._resuming:
            self._resuming = False
            if self.passes and not self.exhausted:
                return self._counted(self._continue_pass())
            if self._persistent() and self._before_workers is not None:
                self._remake_workers()
        self.passes, self.yielded, self.exhausted = self.passes + 1, 0, False
        self._before_pass = self._rng()
        if self._persistent() and getattr(self.loader, "_iterator", None) is None:
            self._before_workers, self._workers_pass = self._before_pass, self.passes
        return self._counted(iter(self.loader))

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self.yielded += 1
            yield batch
        self.exhausted = True

    def _persistent(self) -> bool:
        return bool(self.loader.persistent_workers and self.loader.num_workers > 0 and not self.stateful)

    def _continue_pass(self) -> Iterator[Any]:
        """The pass in progress at the save, made again from the states it began from, past its used
        batches; then every generator is set to the checkpoint's state (what code before the loop
        drew again since restore(), an evaluation at the start of each epoch, leaves no trace)."""
        saved, self._at_save = self._at_save or self._rng(), None
        try:
            if self.stateful:  # it positions itself; only its iter() draws must leave no trace
                return iter(self.loader)
            assert self._before_pass is not None  # checked on load
            if self._persistent() and self._before_workers is not None and self._workers_pass < self.passes:
                self._remake_workers()
            self._set_rng(self._before_pass)
            skipping = _SkippingSampler(self._index_sampler(), self.yielded)
            iterator = self._iter_with(skipping)
            if self.loader.num_workers == 0:  # draw the sampler's seed now, as the first next() did then
                iterator._sampler_iter.skip_now()
            return iterator
        finally:
            self._set_rng(saved)

    def _remake_workers(self) -> None:
        """Persistent workers as the saved run made them (the same base seed), given no index to fetch."""
        assert self._before_workers is not None
        saved = self._rng()
        self._set_rng(self._before_workers)
        self._iter_with([])
        self._set_rng(saved)

    def _index_sampler(self) -> Any:
        return self.loader._index_sampler

    def _iter_with(self, sampler: Any) -> Any:
        """iter(loader) with `sampler` as its index sampler for this pass only.

        DataLoader refuses to have its sampler set after construction, so the attribute is set
        beneath that check and put back at once; an iterator of persistent workers keeps its own
        reference (set for the pass, then put back: its later passes use the loader's sampler)."""
        loader, original = self.loader, self._index_sampler()
        name = "batch_sampler" if loader._auto_collation else "sampler"
        workers = getattr(loader, "_iterator", None)
        object.__setattr__(loader, name, sampler)
        if workers is not None:
            workers._index_sampler = sampler
        try:
            iterator = iter(loader)
        finally:
            object.__setattr__(loader, name, original)
            made = getattr(loader, "_iterator", None)
            if made is not None:
                made._index_sampler = original
        return iterator

    # -- state ---------------------------------------------------------------------
    def batches_per_pass(self) -> int:
        """len(loader), or -1 when it has none."""
        try:
            return len(self.loader)
        except TypeError:
            return -1

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "kind": "stateful" if self.stateful else "dataloader",
            "batches": self.batches_per_pass(),
            "passes": self.passes,
            "yielded": self.yielded,
            "exhausted": self.exhausted,
            "at_save": self._rng(),
        }
        if self.stateful:
            state["loader"] = self.loader.state_dict()  # type: ignore[attr-defined]
        else:
            state["before_pass"] = self._before_pass
            state["before_workers"] = self._before_workers
            state["workers_pass"] = self._workers_pass
        return state

    def check_state_dict(self, state: Any) -> list[str]:
        """Why `state` cannot be loaded into this loader (checked before anything of a checkpoint is loaded)."""
        if not isinstance(state, dict) or state.get("kind") not in ("stateful", "dataloader"):
            return ["the checkpoint holds no data loader position"]
        kind = "stateful" if self.stateful else "dataloader"
        if state["kind"] != kind:
            return [f"the checkpoint's loader was a {state['kind']} loader, this one is a {kind} loader"]
        if not all(
            type(state.get(k)) is int and -(k == "batches") <= state[k] < 2**62
            for k in ("passes", "yielded", "batches")
        ):
            return ["the loader's position must hold integers passes, yielded (>= 0) and batches (>= -1)"]
        if not isinstance(state.get("exhausted"), bool):
            return ["the loader's position must say whether its pass ended (exhausted)"]
        if state["batches"] != self.batches_per_pass():
            return [
                f"the loader gives {self.batches_per_pass()} batches a pass, the checkpoint's gave {state['batches']!r}"
            ]
        if state["batches"] >= 0 and state["yielded"] > state["batches"]:
            return [f"the loader's position (batch {state['yielded']}) lies beyond its pass of {state['batches']}"]
        if not self._valid_rng(state.get("at_save")):
            return ["the loader's position holds no valid generator states of its save"]
        if not self.stateful:
            if state["passes"] and not self._valid_rng(state.get("before_pass")):
                return ["the loader's position lacks valid generator states its pass began from"]
            workers = state.get("before_workers")
            if workers is not None and not self._valid_rng(workers):
                return ["the loader's position holds invalid generator states of its workers"]
            if not (type(state.get("workers_pass")) is int and 0 <= state["workers_pass"] <= state["passes"]):
                return ["the loader's position must hold the pass that made its workers (workers_pass)"]
        return []

    def _valid_rng(self, states: Any) -> bool:
        """Whether `states` can be set: tried on throwaway generators, nothing live is touched."""
        if not (isinstance(states, dict) and isinstance(states.get("generators"), list)):
            return False
        if len(states["generators"]) != len(self._generators()):
            return False
        try:
            for t in (states["cpu"], *states["generators"]):
                if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1):
                    return False
                torch.Generator().set_state(t)
            random.Random().setstate(states["python"])
            np.random.RandomState().set_state(states["numpy"])
        except (TypeError, ValueError, RuntimeError, KeyError, IndexError):
            return False
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if problems := self.check_state_dict(state):
            raise ValueError(problems[0])
        self._at_save = state["at_save"]
        for g, s in zip(self._generators(), self._at_save["generators"]):
            g.set_state(s)
        self.passes, self.yielded, self.exhausted = state["passes"], state["yielded"], state["exhausted"]
        if self.stateful:
            self.loader.load_state_dict(state["loader"])  # type: ignore[attr-defined]
        else:
            self._before_pass = state["before_pass"]
            self._before_workers = state.get("before_workers")
            self._workers_pass = state["workers_pass"]
        self._resuming = True
