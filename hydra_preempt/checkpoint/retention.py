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

from ..errors import ConfigError

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

    def __post_init__(self) -> None:
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(
                f"checkpoint.keep_last must be an integer >= 1 (the newest checkpoint is always kept), got {self.keep_last!r}"
            )
        if not isinstance(self.keep_best, int) or self.keep_best < 0:
            raise ConfigError(f"checkpoint.keep_best must be an integer >= 0, got {self.keep_best!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"checkpoint.mode must be 'min' or 'max', got {self.mode!r}")
        if self.keep_best and not self.metric:
            raise ConfigError(
                "checkpoint.keep_best > 0 needs checkpoint.metric: the name of a reported metric to rank by"
            )

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
