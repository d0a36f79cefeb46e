"""Loss-spike detection: stop a diverging run before its good checkpoints are rotated out.

The baseline is the median of the last `window` values that were not
spikes. A value is a spike when it is not finite or exceeds the baseline by
more than (factor - 1) x |baseline|. `patience` spikes in a row mean the run
diverged. Spikes never enter the baseline, so a long spike cannot raise the
bar it is judged against. Until `min_history` values are seen, nothing is
judged (early losses fall fast and say little).

Which checkpoint a diverged run resumes from (`HealthRule`): a checkpoint
holds the state after its step s, and that state is judged by the next value
(step s + 1). The first suspect step is the earliest of
- the first spike of the run of spikes now under way (`streak_start`);
- the first warm-up value (taken unjudged) that, judged in hindsight,
  exceeds the threshold relative to the lowest warm-up value before it;
- the first non-finite value of a watched metric (the session knows it).
A checkpoint of step s is healthy when s + 1 is before the first suspect
step and its own value, if it carries one, is within the threshold of the
current baseline. The checkpoints newer than the newest healthy one are
set aside when the run stops as diverged, so that a restart resumes from a
state that was judged good.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence, TypeVar

from ..checkpoint.retention import CheckpointRecord
from ..config import DivergenceConfig

R = TypeVar("R", bound=CheckpointRecord)


class Verdict(enum.Enum):
    OK = "ok"
    SUSPECT = "suspect"  # a spike, not yet `patience` in a row: do not trust this state
    DIVERGED = "diverged"


@dataclass
class LossSpikeDetector:
    window: int
    factor: float
    patience: int
    min_history: int
    history: deque = field(init=False, repr=False)
    spikes_in_a_row: int = field(default=0, init=False)
    diverged_reason: str = field(default="", init=False)
    streak_start: int | None = field(default=None, init=False)  # step of the first spike in a row
    warmup: list[tuple[int, float]] = field(default_factory=list, init=False)  # (step, value) taken unjudged

    def __post_init__(self) -> None:  # the values are checked by DivergenceConfig.validate
        self.history = deque(maxlen=self.window)

    @classmethod
    def from_config(cls, c: DivergenceConfig) -> LossSpikeDetector:
        return cls(c.window, c.factor, c.patience, c.min_history)

    @property
    def baseline(self) -> float | None:
        return statistics.median(self.history) if len(self.history) >= self.min_history else None

    def update(self, value: float, step: int) -> Verdict:
        if self.diverged_reason:
            return Verdict.DIVERGED
        baseline = self.baseline
        finite = math.isfinite(value)
        if finite and (baseline is None or value <= self._limit(baseline)):
            self.history.append(value)
            if baseline is None and len(self.warmup) < self.min_history:  # bounded if window < min_history
                self.warmup.append((step, value))
            self.spikes_in_a_row = 0
            self.streak_start = None
            return Verdict.OK
        self.spikes_in_a_row += 1
        if self.streak_start is None:
            self.streak_start = step
        if self.spikes_in_a_row < self.patience:
            return Verdict.SUSPECT
        why = "is not finite" if not finite else f"exceeds {self.factor:g} x the baseline {baseline:.6g}"
        self.diverged_reason = (
            f"loss diverged at step {step}: {self.spikes_in_a_row} values in a row were spikes (last {value:.6g} {why})"
        )
        return Verdict.DIVERGED

    def _limit(self, reference: float) -> float:
        """The highest value that is not a spike against `reference`."""
        return reference + (self.factor - 1.0) * abs(reference)

    def first_suspect_step(self) -> int | None:
        """The start of the spikes under way, or an earlier warm-up value that was a spike in hindsight."""
        lowest: float | None = None
        for step, value in self.warmup:
            if lowest is not None and value > self._limit(lowest):
                return step if self.streak_start is None else min(step, self.streak_start)
            lowest = value if lowest is None else min(lowest, value)
        return self.streak_start

    def health_rule(self, non_finite_since: int | None = None) -> HealthRule:
        """Which checkpoints are healthy, as this detector sees the run now (see the module docstring)."""
        suspect = [s for s in (self.first_suspect_step(), non_finite_since) if s is not None]
        baseline = self.baseline
        return HealthRule(min(suspect, default=None), None if baseline is None else self._limit(baseline))

    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "spikes_in_a_row": self.spikes_in_a_row,
            "diverged_reason": self.diverged_reason,
            "streak_start": self.streak_start,
            "warmup": [list(pair) for pair in self.warmup],
        }

    def load_state_dict(self, state: dict) -> None:
        """Raises ValueError (nothing set) for a state `state_dict` could not have written: values that
        are not finite numbers would make every later judgement wrong (a NaN baseline flags all)."""
        history, spikes, reason = state["history"], state["spikes_in_a_row"], state["diverged_reason"]
        # checkpoints written before these were kept: no streak known, no warm-up to judge again
        streak, warmup = state.get("streak_start"), state.get("warmup", [])
        if not (isinstance(history, list) and all(_finite_number(v) for v in history)):
            raise ValueError("the detector's history must be a list of finite numbers")
        if not (_count(spikes) and isinstance(reason, str) and (streak is None or _count(streak))):
            raise ValueError("the detector's counters must be non-negative integers")
        if not (
            isinstance(warmup, list)
            and all(isinstance(p, list) and len(p) == 2 and _count(p[0]) and _finite_number(p[1]) for p in warmup)
        ):
            raise ValueError("the detector's warm-up record must be [step, value] pairs")
        self.history = deque(history, maxlen=self.window)
        self.spikes_in_a_row, self.diverged_reason, self.streak_start = spikes, reason, streak
        self.warmup = [(step, float(value)) for step, value in warmup]


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class HealthRule:
    """Which checkpoints a run stopped as diverged may resume from (see the module docstring)."""

    first_suspect: int | None = None  # the first step whose value is suspect; None: none is
    limit: float | None = None  # the highest value a healthy checkpoint may carry; None: any

    def healthy(self, record: CheckpointRecord, metric: str) -> bool:
        if self.first_suspect is not None and record.step + 1 >= self.first_suspect:
            return False  # its state produced a suspect value (or came after one)
        value = record.metrics.get(metric)
        if self.limit is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # nothing to judge its own value by
        return math.isfinite(value) and value <= self.limit

    def suspect_tail(self, records: Sequence[R], metric: str) -> list[R]:
        """The records newer than the newest healthy one (all of them if none is healthy), by step."""
        ordered = sorted(records, key=lambda r: r.step)
        healthy = [i for i, r in enumerate(ordered) if self.healthy(r, metric)]
        return ordered[healthy[-1] + 1 :] if healthy else ordered
