"""A training DataLoader as a framework's own loop fetches it (Lightning's, Hugging Face Trainer's): each
pass through a LoaderPosition, and the position to save at the session's step boundary.

A loop that fetches batch by batch is at its position at a boundary. One that fetches one batch ahead
(accelerate's DataLoaderShard; Lightning's prefetch of a loader without a length, to know the last) has
taken a batch of the next step by then: the position saved is the one before that batch was fetched,
with the generator states of that moment; a resumed pass fetches it again from them, then sets every
generator (CUDA's too) to the boundary's. A saved pass that had ended is followed by a new pass that
begins from the boundary's generator states, whatever ran since the restore.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..loader_position import LoaderPosition
from .state import RngReads, restore_rng


class FrameworkLoader:
    """Stands in for the training DataLoader in a framework's loop: what the loop reads of it that is not
    here (sampler, batch_size, dataset, ...) is the loader's. `ahead`: the loop fetches one batch ahead of its step. `rng`: the
    session's reads of the generators (`session.state.rng_reads`: Python's and NumPy's read only when
    they moved, for the position recorded before each fetch)."""

    def __init__(self, loader: DataLoader, ahead: bool, rng: RngReads) -> None:
        self.loader = loader
        self.ahead = ahead
        self.rng = rng
        self.position = LoaderPosition(loader, "train_dataloader", rng.global_states)
        self._before_last: dict[str, Any] | None = None  # with `ahead`: the position before the batch fetched last
        self._resumed: dict[str, Any] | None = None  # a loaded state, until the pass it continues begins

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (a copy being made): no recursion through this method
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        resumed, self._resumed = self._resumed, None
        if resumed is None:  # a new pass draws here what a plain DataLoader's iter() draws
            return self._passed(self.position.iterate(), None)
        # a resumed one at its first next(): Lightning makes the iterator before it sets a
        # DistributedSampler's epoch (and before its restore, when configure_optimizers() asks for
        # trainer.estimated_stepping_batches)
        return self._passed(None, resumed)

    def _passed(self, batches: Iterator[Any] | None, resumed: dict[str, Any] | None) -> Iterator[Any]:
        refetch = False
        if batches is None:
            assert resumed is not None
            if not (self.position.passes and not self.position.exhausted):
                restore_rng(resumed["rng"])  # the saved pass had ended: the next begins from the boundary's states
            else:  # continued from the states it began from, leaving the generators at its saved position's
                refetch = resumed["refetch"]  # and after the batch fetched again, at the boundary's
            batches = self.position.iterate()
        while True:
            if self.ahead:
                self._before_last = self.position.state_dict()
            try:
                batch = next(batches)
            except StopIteration:
                if self.ahead:
                    self._before_last = self.position.state_dict()  # the pass is over: a resume begins the next
                return
            finally:
                if refetch:
                    restore_rng(resumed["rng"])  # type: ignore[index]
                    refetch = False
            yield batch

    def saved_position(self) -> dict[str, Any]:
        """What a checkpoint holds of this loader at a step boundary. Not state_dict(): accelerate's shard
        asks its base for one at every batch when it has one (a copy of every generator a step)."""
        refetch = self.ahead and self._before_last is not None
        position = self._before_last if refetch else self.position.state_dict()
        return {"position": position, "rng": self.rng.capture(), "refetch": refetch}

    def check_position(self, state: Any) -> list[str]:
        if not (isinstance(state, dict) and {"position", "rng", "refetch"} <= state.keys()):
            return ["not a position of the training loader"]
        return self.position.check_state_dict(state["position"])

    def continue_from(self, state: dict[str, Any]) -> None:
        """Continue where `state` (saved_position()) was saved, from the next pass begun."""
        if problems := self.check_position(state):
            raise ConfigError(f"the checkpoint's training loader position does not fit: {problems[0]}")
        self.position.load_state_dict(state["position"])
        self._resumed = state
