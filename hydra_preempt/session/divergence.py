"""Loss-spike detection: stop a diverging run before its good checkpoints are rotated out.

The baseline is the median of the last `window` values that were not
spikes. A value is a spike when it is not finite or exceeds the baseline by
more than (factor - 1) x |baseline|. `patience` spikes in a row mean the run
diverged. Spikes never enter the baseline, so a long spike cannot raise the
bar it is judged against. Until `min_history` values are seen, nothing is
judged (early losses fall fast and say little).
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from ..errors import ConfigError


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

    def __post_init__(self) -> None:
        if self.window < 1 or self.patience < 1 or self.min_history < 1:
            raise ConfigError("divergence.window, divergence.patience and divergence.min_history must be >= 1")
        if not self.factor > 1.0:
            raise ConfigError(f"divergence.factor must be > 1, got {self.factor!r}")
        self.history = deque(maxlen=self.window)

    @property
    def baseline(self) -> float | None:
        return statistics.median(self.history) if len(self.history) >= self.min_history else None

    def update(self, value: float, step: int) -> Verdict:
        if self.diverged_reason:
            return Verdict.DIVERGED
        baseline = self.baseline
        finite = math.isfinite(value)
        if finite and (baseline is None or value <= baseline + (self.factor - 1.0) * abs(baseline)):
            self.history.append(value)
            self.spikes_in_a_row = 0
            return Verdict.OK
        self.spikes_in_a_row += 1
        if self.spikes_in_a_row < self.patience:
            return Verdict.SUSPECT
        why = "is not finite" if not finite else f"exceeds {self.factor:g} x the baseline {baseline:.6g}"
        self.diverged_reason = (
            f"loss diverged at step {step}: {self.spikes_in_a_row} values in a row were spikes (last {value:.6g} {why})"
        )
        return Verdict.DIVERGED

    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "spikes_in_a_row": self.spikes_in_a_row,
            "diverged_reason": self.diverged_reason,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.spikes_in_a_row = int(state["spikes_in_a_row"])
        self.diverged_reason = str(state["diverged_reason"])
