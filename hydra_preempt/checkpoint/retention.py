"""Which checkpoints to keep: the last K by step plus the best N by a reported metric.

Pure logic over plain records, so its invariants are tested without files:
- the newest checkpoint is always kept;
- every checkpoint among the best N is kept;
- at most K + N are kept;
- emergency checkpoints and checkpoints without a finite metric value are never "best".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from ..config import CheckpointConfig

EMERGENCY = "emergency"


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    reason: str
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RetentionPlan:
    best: tuple[int, ...]  # steps, best first
    keep: tuple[int, ...]  # steps, ascending
    delete: tuple[int, ...]  # steps, ascending


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int
    keep_best: int = 0
    metric: str | None = None
    mode: Literal["min", "max"] = "min"

    @classmethod
    def from_config(cls, c: CheckpointConfig) -> RetentionPolicy:
        """The policy of a checkpoint section (its values checked by CheckpointConfig.validate)."""
        return cls(c.keep_last, c.keep_best, c.metric, c.mode)  # type: ignore[arg-type]

    def metric_of(self, record: CheckpointRecord) -> float | None:
        """The value this checkpoint is ranked by, or None if it cannot be among the best."""
        if self.metric is None or record.reason == EMERGENCY:
            return None
        value = record.metrics.get(self.metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    def best(self, records: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
        """The best N, best first; ties go to the earlier step."""
        ranked = [(v, r.step, r) for r in records if (v := self.metric_of(r)) is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        ranked.sort(key=lambda item: (sign * item[0], item[1]))
        return [r for _, _, r in ranked[: self.keep_best]]

    def plan(self, records: Sequence[CheckpointRecord]) -> RetentionPlan:
        by_step = sorted(records, key=lambda r: r.step)
        best = self.best(by_step)
        keep = {r.step for r in by_step[-self.keep_last :]} | {r.step for r in best}
        return RetentionPlan(
            best=tuple(r.step for r in best),
            keep=tuple(sorted(keep)),
            delete=tuple(r.step for r in by_step if r.step not in keep),
        )
