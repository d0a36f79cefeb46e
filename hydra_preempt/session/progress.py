"""The progress line of a run: step/total, steps per second, ETA, the last checkpoint and its age.

`format_progress` is the pure formatting; `Progress` decides when a line is due and where it goes:
on a terminal a live bar rewritten in place (\\r) a few times a second, elsewhere (a SLURM log, a
pipe) one plain line every `progress.every_s` seconds through the logger, with no control characters.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, TextIO

log = logging.getLogger("hydra_preempt")

BAR_WIDTH = 20
TTY_EVERY_S = 0.25  # a live bar refreshed faster than this only costs the step time


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(max(0, round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_progress(
    step: int,
    total: int,
    steps_per_s: float | None,
    checkpoint_step: int | None,
    checkpoint_age_s: float | None,
    bar: bool = False,
) -> str:
    """'step 120/300 (40%) 12.5 steps/s ETA 0:14 | checkpoint step 100, 0:03 ago' (with `bar`: a bar first)."""
    fraction = step / total if total > 0 else 1.0
    rate = f"{steps_per_s:.3g} steps/s" if steps_per_s else "? steps/s"
    eta = (total - step) / steps_per_s if steps_per_s else None
    checkpoint = (
        f"checkpoint step {checkpoint_step}, {_duration(checkpoint_age_s)} ago"
        if checkpoint_step is not None
        else "no checkpoint yet"
    )
    if total <= 0:  # the number of steps is not known (an epoch loop over a loader without a length)
        text = f"step {step} {rate} | {checkpoint}"
        return f"[{'?' * BAR_WIDTH}] {text}" if bar else text
    text = f"step {step}/{total} ({fraction:.0%}) {rate} ETA {_duration(eta)} | {checkpoint}"
    if bar:
        filled = min(BAR_WIDTH, int(fraction * BAR_WIDTH))
        text = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"
    return text


class Progress:
    """Fed at every step boundary; prints when a line is due (a monotonic-clock test, nothing more, otherwise)."""

    def __init__(
        self,
        every_s: float,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.stream = stream
        self.live = stream is not None and stream.isatty()
        self.every_s = TTY_EVERY_S if self.live else every_s
        self.clock, self.wall = clock, wall
        self._start: tuple[float, int] | None = None  # (time, step) when this process began stepping
        self._next = 0.0
        self._drawn = False

    def start(self, step: int) -> None:
        now = self.clock()
        self._start = (now, step)
        self._next = now + self.every_s

    def update(self, step: int, total: int, checkpoint_step: int | None, checkpoint_created: float | None) -> None:
        now = self.clock()
        if self._start is None or now < self._next:
            return
        self._next = now + self.every_s
        self.show(step, total, checkpoint_step, checkpoint_created, now)

    def show(
        self, step: int, total: int, checkpoint_step: int | None, checkpoint_created: float | None, now: float
    ) -> None:
        assert self._start is not None
        began, first = self._start
        rate = (step - first) / (now - began) if now > began and step > first else None
        age = self.wall() - checkpoint_created if checkpoint_created else None
        if self.live:
            assert self.stream is not None
            self.stream.write("\r" + format_progress(step, total, rate, checkpoint_step, age, bar=True) + "\x1b[K")
            self.stream.flush()
            self._drawn = True
        else:
            log.info("%s", format_progress(step, total, rate, checkpoint_step, age))

    def close(self) -> None:
        """End the live bar's line, so that what is printed next starts on its own."""
        if self._drawn and self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
