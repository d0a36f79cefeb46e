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

Random draws inside worker processes (augmentations in `__getitem__` or in
`collate_fn` that use torch's, NumPy's or Python's global generators) are
positioned too: each batch a worker makes carries that worker's generator
states after it (`_Carried`, unwrapped before the batch is handed out), and
the states after each worker's last batch used are saved. A resumed pass
gives the batch after the last used to the worker that made it in the saved
run (batch b goes to worker b % num_workers, as torch's in-order loader
deals them), and each worker's first batch carries the states that worker
had (`_Indices`, set in the worker before it fetches anything);
`worker_init_fn` runs as it did. Persistent workers keep theirs across passes.

Not positioned: generators a dataset holds itself (a `np.random.default_rng()`
made in `worker_init_fn`), a loader with `in_order=False` (batches come as
workers finish them: no run is repeatable), and with `batch_size=None` and
workers, the draws of each worker's first sample after a resume. An
IterableDataset cannot be positioned by a plain DataLoader and is refused.
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
import weakref
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, get_worker_info
from torch.utils.data._utils.pin_memory import pin_memory

from .errors import CheckpointReadError, ConfigError

log = logging.getLogger("hydra_preempt")

_END = object()


def _worker_rng() -> dict[str, Any]:
    """This process's global generator states: torch's CPU one, NumPy's, Python's. Torch's as bytes: a
    tensor crosses the worker's queue through a shared-memory file of its own, bytes within the pickle."""
    return {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _saved_worker_rng(carried: dict[str, Any]) -> dict[str, Any]:
    """A worker's states as a checkpoint holds them: torch's as a tensor, Python's words as an array (the
    position is copied at every step start: an array of 625 words copies at once, a tuple of 625 ints not)."""
    version, words, gauss = carried["python"]
    return {
        "torch": torch.frombuffer(bytearray(carried["torch"]), dtype=torch.uint8),
        "numpy": carried["numpy"],
        "python": (version, np.array(words, dtype=np.uint32), gauss),
    }


def _python_state(saved: Any) -> Any:
    """random.setstate()'s tuple from the saved one."""
    version, words, gauss = saved
    return version, tuple(int(w) for w in words), gauss


def _set_worker_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(_python_state(states["python"]))


class _Carried:
    """A batch made by a worker, with the worker's generator states after making it."""

    def __init__(self, batch: Any, worker: int, rng: dict[str, Any]) -> None:
        self.batch, self.worker, self.rng = batch, worker, rng

    def pin_memory(self) -> _Carried:
        """The loader's pin_memory thread pins the batch and keeps the rest (torch calls a batch's own pin_memory())."""
        return _Carried(pin_memory(self.batch), self.worker, self.rng)

    # Persistent workers made by the session wrap their batches for any iterator of the loader: one the
    # program makes itself (an evaluation over the training loader) gets batches that act as theirs.
    def __iter__(self) -> Iterator[Any]:
        return iter(self.batch)

    def __getitem__(self, key: Any) -> Any:
        return self.batch[key]

    def __len__(self) -> int:
        return len(self.batch)

    def __getattr__(self, name: str) -> Any:
        if name == "batch":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.batch, name)


class _CarryRng:
    """A loader's collate_fn, wrapped: in a worker the batch leaves as `_Carried`; in the main process, as it is."""

    def __init__(self, collate_fn: Any) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: Any) -> Any:
        batch = self.collate_fn(samples)
        info = get_worker_info()
        return batch if info is None else _Carried(batch, info.id, _worker_rng())


class _Indices(list):
    """A batch of indices that sets the generator states of the worker that fetches it first (a
    worker's first batch after a resume): the fetch reads the indices before it draws anything. Only
    in a worker: the main process iterates it too, to send it."""

    def __init__(self, indices: Any, rng: dict[str, Any]) -> None:
        super().__init__(indices)
        self.rng: dict[str, Any] | None = rng

    def _start(self) -> None:
        if self.rng is not None and get_worker_info() is not None:
            rng, self.rng = self.rng, None
            _set_worker_rng(rng)

    def __iter__(self) -> Iterator[Any]:
        self._start()
        return super().__iter__()

    def __getitem__(self, item: Any) -> Any:
        self._start()
        return super().__getitem__(item)

    def __len__(self) -> int:
        self._start()
        return super().__len__()


class _PassIterator:
    """A loader's index sampler's iterator for one pass: it first passes over `skip` batches of indices
    (fetching nothing), and gives the first batch each worker gets the generator states in `pending`
    (worker -> states; batch b goes to worker b % workers). `paused`: ends at once, resumable."""

    def __init__(self, inner: Iterator[Any], skip: int, workers: int, pending: list[Any] | None) -> None:
        self.inner, self.skip, self.workers, self.pending = inner, skip, workers, pending
        self.batch = skip  # the number, within the pass, of the next batch handed out
        self.paused = False

    def skip_now(self) -> None:
        while self.skip:
            self.skip -= 1
            if next(self.inner, _END) is _END:
                self.skip = 0

    def __iter__(self) -> _PassIterator:
        return self

    def __next__(self) -> Any:
        if self.paused:
            raise StopIteration
        self.skip_now()
        indices = next(self.inner)
        if self.pending and isinstance(indices, list) and (rng := self.pending[self.batch % self.workers]) is not None:
            self.pending[self.batch % self.workers] = None
            indices = _Indices(indices, rng)
        self.batch += 1
        return indices


class _PassSampler:
    """Stands in for a loader's index sampler for one pass; lazy, as the sampler is."""

    def __init__(self, sampler: Any, skip: int = 0, workers: int = 0, pending: list[Any] | None = None) -> None:
        self.sampler, self.skip, self.workers, self.pending = sampler, skip, workers, pending
        self.paused = False  # its iterators start paused

    def __iter__(self) -> _PassIterator:
        iterator = _PassIterator(iter(self.sampler), self.skip, self.workers, self.pending)
        iterator.paused = self.paused
        return iterator

    def __len__(self) -> int:
        return len(self.sampler)


class _SamplerDraws:
    """Stands in for a sampler without state of its own while a StatefulDataLoader's iterator is made,
    and records the generator states its draws began from: at its last iter() (a shuffle made there)
    and at the first next() of that iterator (a lazy one: a WeightedRandomSampler's multinomial).
    torchdata resumes such a sampler by calling iter() on it again (more than once) and skipping
    what was used; while a resumed iterator is made (`replay`), each iter() and first next() starts
    from the recorded states, so the samples skipped and those that follow are the saved run's."""

    def __init__(self, sampler: Any, rng: Callable[[], dict[str, Any]], set_rng: Callable[[Any], None]) -> None:
        self.sampler, self._rng, self._set_rng = sampler, rng, set_rng
        self.at_iter: dict[str, Any] | None = None
        self.at_next: dict[str, Any] | None = None
        self.replay = False
        self._last: _FirstNext | None = None

    def __iter__(self) -> Iterator[Any]:
        if not self.replay:
            self.at_iter, self.at_next = self._rng(), None
        elif self.at_iter is not None:
            self._set_rng(self.at_iter)
        iterator = iter(self.sampler)
        if _has_state(iterator):  # torchdata's own sampler iterators position themselves
            return iterator
        self._last = _FirstNext(iterator, self)
        return self._last

    def first_next(self) -> None:
        if not self.replay:
            self.at_next = self._rng()
        elif self.at_next is not None:
            self._set_rng(self.at_next)

    def begin(self) -> None:
        """Make the first draw of the last iterator now (a resumed one: while the states are replayed)."""
        if self._last is not None:
            self._last.begin()

    @property
    def ended(self) -> bool:
        """The last iterator came to its end (a sampler may draw there: RandomSampler with a generator)."""
        return self._last is not None and self._last.ended

    def end(self) -> None:
        """Bring the last iterator to its end now, as the saved run's was, keeping what it still had."""
        if self._last is not None:
            self._last.end()

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["sampler"], name)


class _FirstNext:
    """A sampler's iterator that tells its _SamplerDraws of its first next()."""

    def __init__(self, iterator: Iterator[Any], draws: _SamplerDraws) -> None:
        self._iterator, self._draws, self._begun, self._first = iterator, draws, False, list[Any]()
        self.ended = False

    def __iter__(self) -> _FirstNext:
        return self

    def __next__(self) -> Any:
        if self._first:
            return self._first.pop()
        if not self._begun:
            self._begun = True
            self._draws.first_next()
        try:
            return next(self._iterator)
        except StopIteration:
            self.ended = True
            raise

    def begin(self) -> None:
        if not self._begun:
            self._first = list(itertools.islice(self, 1))

    def end(self) -> None:
        if not self._first and not self.ended:
            self._first = list(itertools.islice(self, 1))  # nothing, if the saved run's end is here


def _has_state(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _deal_from(iterator: Any, first_worker: int) -> None:
    """Let a multiprocessing loader iterator made with a paused _PassSampler deal its batches from
    `first_worker` on (torch starts each pass at worker 0), then prefetch as torch would have."""
    workers = iterator._num_workers
    iterator._worker_queue_idx_cycle = itertools.cycle([*range(first_worker, workers), *range(first_worker)])
    iterator._sampler_iter.paused = False
    for _ in range(iterator._prefetch_factor * workers):
        iterator._try_put_index()


def _structure_copied(state: Any) -> Any:
    """A copy of `state`'s dicts and lists; its tensors (generator states a state_dict() call makes anew)
    as they are: a tensor's deepcopy costs ~30 us."""
    tensors: dict[int, Any] = {}
    stack = [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            tensors[id(obj)] = obj
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return copy.deepcopy(state, tensors)


def _global_rng() -> tuple[torch.Tensor, Any, Any]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


class LoaderPosition:
    """The position of a DataLoader (or StatefulDataLoader): passes begun, batches handed out of the
    current one, and the generator states its current pass began from. See the module's text."""

    # state_dict() is made anew at each call and nothing in it is changed later (states recorded at a
    # pass's start are replaced, never changed), so a step start keeps it without a copy (StateRegistry)
    state_dict_is_fresh = True

    def __init__(
        self, loader: DataLoader, name: str = "data", global_rng: Callable[[], tuple[Any, Any, Any]] = _global_rng
    ) -> None:
        """`global_rng`: what reads torch's CPU, Python's and NumPy's global generator states (the
        session's reads Python's and NumPy's only when they moved)."""
        self.loader, self.name, self._global_rng = loader, name, global_rng
        self.stateful = _has_state(loader)
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) and not (self.stateful and _has_state(dataset)):
            has_state = _has_state(dataset)
            raise ConfigError(
                f"cannot position a DataLoader over {type(dataset).__name__}, an IterableDataset: "
                + (
                    "torch's DataLoader cannot hand its state_dict() to the dataset in its workers; torchdata's "
                    "StatefulDataLoader can (the same arguments)"
                    if has_state
                    else "it has no state_dict()/load_state_dict(), so a resumed run would see other data; use a "
                    "map-style Dataset, or torchdata's StatefulDataLoader over a dataset with state_dict()/load_state_dict()"
                )
            )
        self._workers = 0 if self.stateful else loader.num_workers
        if self._workers and not getattr(loader, "in_order", True):
            log.warning(
                "this DataLoader has in_order=False: its batches come in the order its workers finish them, so "
                "no run of it (resumed or not) repeats another; in_order=True (the default) keeps the order"
            )
        self.passes = 0  # iter() calls made through iterate()
        self.yielded = 0  # batches handed out by the current pass
        self.exhausted = False  # the current pass ended (to its last batch, or its loop was left: left_early)
        self.left_early = False
        self.pass_epoch: int | None = None  # the epoch of epochs() the current pass belongs to
        self.epoch_in_progress: int | None = None  # the epoch of the epochs() loop this loader counts, while in it
        self._before_pass: dict[str, Any] | None = None  # generator states the current pass began from
        self._before_workers: dict[str, Any] | None = None  # persistent workers: states they were made from
        self._workers_pass = 0  # ... and the pass that made them
        self._resuming = False  # a loaded position, applied at the next iterate()
        self._at_save: dict[str, Any] | None = None  # generator states of the checkpoint (a loaded position)
        self._worker_rng: list[Any] = [None] * self._workers  # each worker's states after its last batch used
        self._pending: list[Any] | None = None  # the states each worker starts its first batch from (a load)
        self._draws: dict[str, _SamplerDraws] = {}
        self._found_generators: list[Any] | None = None  # _pass_generators()
        self._loaded_draws: dict[str, Any] = {}  # StatefulDataLoader: its stateless samplers' draws this pass
        self._watch_iterators()

    # -- iterators made elsewhere ---------------------------------------------------
    def _watch_iterators(self) -> None:
        """Say once when the program makes an iterator of this loader itself (`iter(loader)`, a plain
        for): what it draws moves no position, so a resumed run would start that data over. (A
        DataLoader's __iter__ calls self._get_iterator(): an instance attribute stands in for it,
        holding this position weakly; release() removes it.)"""
        position, make = weakref.ref(self), self.loader._get_iterator
        self._own_iterator = self._said_elsewhere = False

        def watched() -> Any:
            me = position()
            if me is not None and not me._own_iterator:
                me._say_iterated_elsewhere()
            return make()

        self.loader._get_iterator = watched  # type: ignore[method-assign]

    def _say_iterated_elsewhere(self) -> None:
        if not self._said_elsewhere:
            self._said_elsewhere = True
            log.warning(
                "%r, a registered DataLoader, was iterated without session.batches() (iter(loader), a plain for): "
                "what that draws has no position, so a resumed run starts it over; loop with "
                "`for batch in session.batches(loader)`, or leave the loader unregistered",
                self.name,
            )

    def release(self) -> None:
        """The run ended: the loader's own _get_iterator again."""
        self.loader.__dict__.pop("_get_iterator", None)

    # -- generators --------------------------------------------------------------
    def _generators(self) -> list[Any]:
        """The generators this loader draws from, besides the global ones: those the loader, its sampler
        and its batch sampler hold as attributes (`generator`, or any other name: a torch.Generator, a
        NumPy Generator or RandomState, a random.Random), in attribute order. One held deeper (inside
        another object) is not found: see the module's text."""
        found: list[Any] = []
        sampler = getattr(self.loader, "sampler", None)
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        for holder in (self.loader, sampler, getattr(batch_sampler, "sampler", None), batch_sampler):
            for g in getattr(holder, "__dict__", {}).values():
                if (
                    isinstance(g, _GENERATORS)
                    and not isinstance(g, random.SystemRandom)
                    and all(g is not f for f in found)
                ):
                    found.append(g)
        return found

    def _rng(self, generators: list[Any] | None = None) -> dict[str, Any]:
        """The states of every generator a pass may draw from: torch's, Python's and NumPy's global ones
        (a custom sampler may shuffle with `random`), the loader's and its sampler's."""
        cpu, python, numpy = self._global_rng()
        return {
            "cpu": cpu,
            "python": python,
            "numpy": numpy,
            "generators": [_state_of(g) for g in (self._pass_generators() if generators is None else generators)],
        }

    def _pass_generators(self) -> list[Any]:
        """_generators(), found again at each pass's start and load (a step start records their states:
        finding them costs more than reading them)."""
        if self._found_generators is None:
            self._found_generators = self._generators()
        return self._found_generators

    def _set_rng(self, states: dict[str, Any], generators: list[Any] | None = None) -> None:
        torch.set_rng_state(states["cpu"])
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        for g, s in zip(self._generators() if generators is None else generators, states["generators"]):
            _set_state(g, s)

    # -- passes ------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The pass to run next, or the one in progress (counted from 0)."""
        return self.passes - 1 if self.passes and not self.exhausted else self.passes

    def iterate(self, epoch: int | None = None) -> Iterator[Any]:
        """One pass over the loader, for epoch `epoch` of epochs() (None: outside it); after a load, the
        rest of the pass in progress, if one was; none if the epoch's pass ended before the save."""
        if self._resuming:
            self._resuming = False
            current = epoch is None or self.pass_epoch in (None, epoch)  # a pass of an earlier epoch is over
            if self.passes and not self.exhausted and current:
                return self._counted(self._continue_pass())
            if self._persistent() and self._before_workers is not None:
                self._remake_workers()
            if self.stateful and self.left_early:  # its own state is of the pass left: the next one starts afresh
                self.loader.next_iter_state = None
            if epoch is not None and self.pass_epoch == epoch:  # this epoch's pass ended before the save
                self._set_rng(self._at_save or self._rng())  # what code before the loop drew leaves no trace
                self._at_save = None
                return self._counted(iter(()))
        self.pass_epoch, self.left_early, self._found_generators = epoch, False, None
        self.passes, self.yielded, self.exhausted = self.passes + 1, 0, False
        self._before_pass = self._rng()
        if not self._persistent() or getattr(self.loader, "_iterator", None) is None:  # new workers, fresh streams
            self._worker_rng, self._pending = [None] * self._workers, None
            if self._persistent():
                self._before_workers, self._workers_pass = self._before_pass, self.passes
        if self.stateful:
            return self._counted(self._make_stateful_iterator({}))
        pending = self._pending if self._pending and any(s is not None for s in self._pending) else None
        sampler = _PassSampler(self._index_sampler(), 0, self._workers, pending) if pending else None
        return self._counted(self._make_iterator(sampler))

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            if isinstance(batch, _Carried):
                self._worker_rng[batch.worker] = _saved_worker_rng(batch.rng)
                batch = batch.batch
            self.yielded += 1
            yield batch
        self.exhausted = True

    def end_pass(self) -> None:
        """The program left the pass's loop before its end (break): the pass is over all the same."""
        self.exhausted = self.left_early = True

    def _persistent(self) -> bool:
        return bool(self.loader.persistent_workers and self.loader.num_workers > 0 and not self.stateful)

    def _continue_pass(self) -> Iterator[Any]:
        """The pass in progress at the save, made again from the states it began from, past its used
        batches, the next one dealt to the worker that made it in the saved run, each worker starting
        from its saved states; then every generator is set to the checkpoint's state (what code before
        the loop drew again since restore(), an evaluation at the start of each epoch, leaves no trace)."""
        saved, self._at_save = self._at_save or self._rng(), None
        try:
            if self.stateful:  # it positions itself; its samplers' draws are replayed, then leave no trace
                try:
                    return self._make_stateful_iterator(self._loaded_draws)
                except Exception as e:  # its own state, loaded only now: a checkpoint edited and signed again
                    raise CheckpointReadError(
                        f"the checkpoint's StatefulDataLoader state does not load into this loader "
                        f"({type(e).__name__}: {e}); nothing was trained from it"[:400]
                    ) from None
            assert self._before_pass is not None  # checked on load
            if self._persistent() and self._before_workers is not None and self._workers_pass < self.passes:
                self._remake_workers()
            self._set_rng(self._before_pass)
            # torch's own iterator deals from a chosen worker; a subclass's own __iter__ is not positioned there
            dealt = bool(self._workers) and type(self.loader).__iter__ is DataLoader.__iter__
            sampler = _PassSampler(self._index_sampler(), self.yielded, self._workers, self._pending if dealt else None)
            sampler.paused = dealt  # nothing dealt before _deal_from
            iterator = self._make_iterator(sampler)
            if dealt:
                _deal_from(iterator, self.yielded % self._workers)
            elif not self._workers:  # draw the sampler's seed now, as the first next() did then
                iterator._sampler_iter.skip_now()
            return iterator
        finally:
            self._set_rng(saved)

    def _make_stateful_iterator(self, replay: dict[str, Any]) -> Any:
        """iter() of a StatefulDataLoader with its index sampler and a batch sampler's sampler, where
        they have no state of their own, standing in as _SamplerDraws (they stay with the iterator for
        its pass; the loader gets its own back at once). `replay`: the draws a resumed pass replays."""
        generators = self._pass_generators()
        index = self._index_sampler()
        inner = getattr(index, "sampler", None)  # a batch sampler's sampler
        self._draws = {}
        for name, sampler in (("sampler", inner), ("index", index)):
            if sampler is not None and not _has_state(sampler):
                draws = self._draws[name] = _SamplerDraws(
                    sampler, lambda: self._rng(generators), lambda s: self._set_rng(s, generators)
                )
                if name in replay:
                    draws.at_iter, draws.at_next, draws.replay = replay[name]["iter"], replay[name]["next"], True
        if "sampler" in self._draws:
            index.sampler = self._draws["sampler"]
        try:
            iterator = self._make_iterator(self._draws.get("index"))
            for name, draws in self._draws.items():
                if draws.replay:
                    draws.begin()
                    if replay[name].get("ended"):
                        draws.end()
            return iterator
        finally:
            for draws in self._draws.values():
                draws.replay = False
            if "sampler" in self._draws:
                index.sampler = inner

    def _remake_workers(self) -> None:
        """Persistent workers as the saved run made them (the same base seed), given no index to fetch."""
        assert self._before_workers is not None
        saved = self._rng()
        self._set_rng(self._before_workers)
        self._make_iterator([])
        self._set_rng(saved)

    def _index_sampler(self) -> Any:
        return self.loader._index_sampler

    def _make_iterator(self, sampler: Any = None) -> Any:
        """iter(loader), its workers' batches carrying their generator states (`_CarryRng`), with
        `sampler` (when given) as its index sampler for this pass only.

        DataLoader refuses to have its sampler set after construction, so the attribute is set
        beneath that check and put back at once; an iterator of persistent workers keeps its own
        reference (set for the pass, then put back: its later passes use the loader's sampler). An
        iterator takes the collate_fn when it is made: the loader's own is put back at once too."""
        loader, original, collate_fn = self.loader, self._index_sampler(), self.loader.collate_fn
        name = "batch_sampler" if loader._auto_collation else "sampler"
        workers = getattr(loader, "_iterator", None)
        if sampler is not None:
            object.__setattr__(loader, name, sampler)
            if workers is not None:
                workers._index_sampler = sampler
        if self._workers:
            loader.collate_fn = _CarryRng(collate_fn)
        self._own_iterator = True
        try:
            return iter(loader)
        finally:
            self._own_iterator = False
            loader.collate_fn = collate_fn
            if sampler is not None:
                object.__setattr__(loader, name, original)
                made = getattr(loader, "_iterator", None)
                if made is not None:
                    made._index_sampler = original

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
            "left_early": self.left_early,
            "pass_epoch": self.pass_epoch,
            "epoch_in_progress": self.epoch_in_progress,
            "at_save": self._rng(),
            "shape": self._shape(),
        }
        if self.stateful:
            self._own_iterator = True  # a StatefulDataLoader not iterated yet makes an iterator for its state
            try:
                # torchdata's state may hold its workers' snapshots, which it updates in place
                state["loader"] = _structure_copied(self.loader.state_dict())  # type: ignore[attr-defined]
            finally:
                self._own_iterator = False
            state["sampler_draws"] = {
                name: {"iter": d.at_iter, "next": d.at_next, "ended": d.ended} for name, d in self._draws.items()
            }
        else:
            state["before_pass"] = self._before_pass
            state["before_workers"] = self._before_workers
            state["workers_pass"] = self._workers_pass
            state["worker_rng"] = list(self._worker_rng)
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
        for key in ("pass_epoch", "epoch_in_progress"):
            if (value := state.get(key)) is not None and not (type(value) is int and 0 <= value < 2**62):
                return [f"the loader's position must hold {key} as a non-negative integer"]
        if changes := _changes(state.get("shape"), self._shape()):
            return [
                f"the loader changed since the save ({'; '.join(changes)}): its position would land on other "
                "samples (nothing was loaded); to train on with this loader, start a new run directory (the "
                "model's weights: hydra-preempt export RUN_DIR --out FILE)"
            ]
        if state["batches"] != self.batches_per_pass():
            return [
                f"the loader gives {self.batches_per_pass()} batches a pass, the checkpoint's gave {state['batches']!r}"
            ]
        if state["batches"] >= 0 and state["yielded"] > state["batches"]:
            return [f"the loader's position (batch {state['yielded']}) lies beyond its pass of {state['batches']}"]
        if not self._valid_rng(state.get("at_save")):
            return ["the loader's position holds no valid generator states of its save"]
        if self.stateful and (problem := _stateful_disagrees(state.get("loader"), state["yielded"])):
            return [problem]
        draws = state.get("sampler_draws", {})  # none in a checkpoint from before they were recorded
        if self.stateful and not (
            isinstance(draws, dict)
            and all(
                name in ("sampler", "index")
                and isinstance(d, dict)
                and all(d.get(k) is None or self._valid_rng(d[k]) for k in ("iter", "next"))
                and isinstance(d.get("ended", False), bool)
                for name, d in draws.items()
            )
        ):
            return ["the loader's position holds invalid generator states of its samplers' draws"]
        if not self.stateful:
            if state["passes"] and not self._valid_rng(state.get("before_pass")):
                return ["the loader's position lacks valid generator states its pass began from"]
            workers = state.get("before_workers")
            if workers is not None and not self._valid_rng(workers):
                return ["the loader's position holds invalid generator states of its workers"]
            if not (type(state.get("workers_pass")) is int and 0 <= state["workers_pass"] <= state["passes"]):
                return ["the loader's position must hold the pass that made its workers (workers_pass)"]
            worker_rng = state.get("worker_rng", [])
            if not (isinstance(worker_rng, list) and all(s is None or _valid_worker_rng(s) for s in worker_rng)):
                return ["the loader's position holds invalid generator states of its workers' batches"]
        return []

    def _shape(self) -> dict[str, Any]:
        """What places a position on samples besides the generators: a change to any of it moves it.
        (num_workers, pin_memory, prefetching do not: they are not here.)"""
        loader = self.loader
        sampler, batch_sampler = getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)
        batching = loader if loader.batch_size is not None else batch_sampler
        shape = {
            "dataset samples": _length(loader.dataset),
            "batch_size": getattr(batching, "batch_size", None),
            "drop_last": getattr(batching, "drop_last", None),
            "sampler": _class_name(sampler),
            "batch_sampler": _class_name(batch_sampler),
        }
        if isinstance(sampler, DistributedSampler):
            shape["DistributedSampler replicas, rank"] = [sampler.num_replicas, sampler.rank]
        return shape

    def _valid_rng(self, states: Any) -> bool:
        """Whether `states` can be set: tried on throwaway generators, nothing live is touched."""
        if not (isinstance(states, dict) and isinstance(states.get("generators"), list)):
            return False
        generators = self._generators()
        if len(states["generators"]) != len(generators):
            return False
        try:
            if not _is_torch_state(states["cpu"]):
                return False
            _try_global_states(states["cpu"], states["numpy"], states["python"])
            for g, state in zip(generators, states["generators"]):
                if isinstance(g, torch.Generator) and not _is_torch_state(state):
                    return False
                _set_state(_throwaway_like(g), state)
        except (TypeError, ValueError, RuntimeError, KeyError, IndexError):
            return False
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if problems := self.check_state_dict(state):
            raise ValueError(problems[0])
        self._at_save, self._found_generators = state["at_save"], None
        for g, s in zip(self._generators(), self._at_save["generators"]):
            _set_state(g, s)
        self.passes, self.yielded, self.exhausted = state["passes"], state["yielded"], state["exhausted"]
        self.pass_epoch, self.epoch_in_progress = state.get("pass_epoch"), state.get("epoch_in_progress")
        self.left_early = state.get("left_early") is True
        if self.stateful:
            self.loader.load_state_dict(state["loader"])  # type: ignore[attr-defined]
            self._loaded_draws = state.get("sampler_draws", {})
        else:
            self._before_pass = state["before_pass"]
            self._before_workers = state.get("before_workers")
            self._workers_pass = state["workers_pass"]
            self._load_worker_rng(state.get("worker_rng", []))
        self._resuming = True

    def _load_worker_rng(self, saved: list[Any]) -> None:
        """Each worker's states after its last batch used: what its next batch starts from."""
        if any(s is not None for s in saved) and len(saved) != self._workers:
            log.warning(
                "the checkpoint's DataLoader had %d workers, this one has %d: random draws inside the workers "
                "(augmentations) differ from the saved run's from here on; the batches themselves do not",
                len(saved),
                self._workers,
            )
            saved = []
        self._worker_rng = list(saved) if saved else [None] * self._workers
        self._pending = list(self._worker_rng)


def _valid_worker_rng(states: Any) -> bool:
    """Whether a worker's saved generator states can be set: tried on throwaway generators."""
    if not (isinstance(states, dict) and isinstance(states.get("torch"), torch.Tensor)):
        return False
    try:
        _try_global_states(states["torch"], states["numpy"], _python_state(states["python"]))
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, OverflowError):
        return False
    return True


def _try_global_states(torch_state: Any, numpy_state: Any, python_state: Any) -> None:
    """Set the states of torch's, NumPy's and Python's global generators on throwaway ones: what they
    would refuse raises, nothing live is touched."""
    torch.Generator().set_state(torch_state)
    np.random.RandomState().set_state(numpy_state)
    random.Random().setstate(python_state)


def _changes(saved: Any, now: dict[str, Any]) -> list[str]:
    """What differs between a saved loader shape and this one's, as "key old -> new" (none when a
    checkpoint of an older version holds no shape)."""
    if not isinstance(saved, dict):
        return []
    return [f"{key} {saved.get(key)!r:.60} -> {value!r:.60}" for key, value in now.items() if saved.get(key) != value]


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an IterableDataset without len()
        return None


def _class_name(obj: Any) -> str | None:
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


def _stateful_disagrees(loader_state: Any, yielded: int) -> str | None:
    """Why a StatefulDataLoader's saved state cannot be the one saved with this position: it must be a
    mapping whose count of batches handed out (torchdata's `_num_yielded`; with workers, the step of its
    snapshot and the steps since) is the position's. The rest it checks itself as the resumed pass begins."""
    if not isinstance(loader_state, dict):
        return "the loader's position holds no StatefulDataLoader state"
    snapshot = loader_state.get("_snapshot")
    if isinstance(snapshot, dict):
        parts = (snapshot.get("_snapshot_step"), loader_state.get("_steps_since_snapshot"))
        count: Any = sum(parts) if all(type(p) is int for p in parts) else parts
    else:
        count = loader_state.get("_num_yielded")
    if count is not None and not (type(count) is int and count == yielded):
        return f"the StatefulDataLoader's state counts {count!r:.40} batches, its position {yielded}"
    return None


_GENERATORS = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def _state_of(generator: Any) -> Any:
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    if isinstance(generator, np.random.RandomState):
        return generator.get_state()
    return generator.getstate()


def _set_state(generator: Any, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    elif isinstance(generator, np.random.RandomState):
        generator.set_state(state)
    else:
        generator.setstate(state)


def _throwaway_like(generator: Any) -> Any:
    """A new generator of the same kind, to try a saved state on."""
    if isinstance(generator, np.random.Generator):
        return np.random.Generator(type(generator.bit_generator)())
    if isinstance(generator, torch.Generator):
        return torch.Generator(device=generator.device)  # a CUDA generator's state is not a CPU one's
    return next(
        kind() for kind in (torch.Generator, np.random.RandomState, random.Random) if isinstance(generator, kind)
    )


def _is_torch_state(state: Any) -> bool:
    return isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1
