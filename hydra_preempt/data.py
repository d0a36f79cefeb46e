"""Data order that resumes at the exact next batch.

The order of epoch `e` is a permutation drawn from (seed, e) alone, so a
resumed run rebuilds it and starts at batch `index` directly, without
iterating through the batches it already used. The main process's random
generators are never touched, so the data order and the model's randomness
(dropout, augmentation in the main process) stay independent.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import CheckpointMismatchError, ConfigError

_MASK63 = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed per (seed, epoch); an affine mix so that nearby pairs do not collide."""
    return (seed * 6364136223846793005 + epoch * 1442695040888963407 + 1) & _MASK63


class ResumableLoader:
    """Endless iterator over mini-batches of `dataset`, epoch after epoch.

    Its state (epoch, index of the next batch within the epoch, seed) is
    what the session saves; `load_state_dict` makes the next batch exactly
    the one an uninterrupted run would have drawn. With `world_size` > 1,
    rank r takes every world_size-th sample of the epoch's order, starting
    at r (register it with `session.register_per_rank`). Extra keyword
    arguments go to torch's DataLoader (num_workers, pin_memory,
    collate_fn, ...); worker seeds are derived from (seed, epoch) as well.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        **dataloader_kwargs: Any,
    ) -> None:
        for bad in ("batch_sampler", "sampler", "shuffle", "batch_size", "drop_last", "generator"):
            if bad in dataloader_kwargs:
                raise ConfigError(f"ResumableLoader sets {bad!r} itself; do not pass it")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.rank, self.world_size = rank, world_size
        self.num_samples = len(dataset) // world_size  # type: ignore[arg-type]  # every rank gets as many
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.dataloader_kwargs = dataloader_kwargs
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"dataset of {self.num_samples} samples gives no batch of {batch_size} (drop_last={drop_last})"
            )
        self.epoch = 0
        self.index = 0
        self._iterator: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The index lists of every batch of `epoch`, in order."""
        total = self.num_samples * self.world_size
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(len(self.dataset), generator=generator)[:total].tolist()  # type: ignore[arg-type]
        else:
            order = list(range(total))
        order = order[self.rank :: self.world_size]
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.batches_per_epoch)]

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            remaining = self.epoch_batches(self.epoch)[self.index :]
            loader = DataLoader(
                self.dataset,
                batch_sampler=remaining,
                generator=torch.Generator().manual_seed(epoch_seed(self.seed + 1 + self.rank, self.epoch)),
                **self.dataloader_kwargs,
            )
            self._iterator = iter(loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self.index = 0
            self._iterator = None
            return next(self)
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def check_state_dict(self, state: Any) -> list[str]:
        """Why `state` cannot be loaded (checked before anything of a checkpoint is loaded)."""
        keys = ("epoch", "index", "seed", "num_samples", "batch_size")
        if not isinstance(state, dict) or not all(
            isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and 0 <= state[k] < 2**62 for k in keys
        ):
            return [f"the data loader's state must hold non-negative integers {', '.join(keys)}"]
        if state["index"] > self.batches_per_epoch:
            return [f"the data loader's position (batch {state['index']}) lies beyond its epoch"]
        return []

    def load_state_dict(self, state: dict[str, int]) -> None:
        if problems := self.check_state_dict(state):
            raise ValueError(problems[0])
        for key in ("seed", "num_samples", "batch_size"):
            if state[key] != getattr(self, key):
                raise CheckpointMismatchError(
                    f"data loader {key} differs: checkpoint has {state[key]}, this run has {getattr(self, key)}; "
                    "resuming would not continue the same data order"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._iterator = None
