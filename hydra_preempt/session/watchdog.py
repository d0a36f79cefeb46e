"""The hang watchdog: a thread that notices when the training loop stops making progress.

The session beats the heartbeat at every step boundary (`Watchdog.beat`: one
monotonic clock read and two stores, ~0.3 us measured). A daemon thread compares the
time since the last beat with the allowed time:

- before the first step ends (start-up, restore): `startup_s`;
- while a step runs: `timeout_s`, or when null max(10 x the slowest of the
  recent steps, `min_timeout_s`) (`hang_timeout`);
- while the session saves at a boundary (`slow_work`): `startup_s`, a save
  of a large state may take many steps' time;
- while a phase the training function announced runs (`phase`, which
  `Session.long_phase` opens: an evaluation, a data set rebuilt): its own
  allowance, `startup_s` unless given;
- after the step loop ended: not watched (user code the session knows nothing of).

Progress is measured in time the process could run: a wake-up of the thread that comes
much later than it asked for (`stopped_time`) means the whole process was stopped
(SIGSTOP/SIGCONT, SLURM's `scontrol suspend`, which sends exactly those) or not
scheduled; that gap does not count as waiting for the progress last seen before it (a
beat after the resume waits from then on), so a suspended job is not killed as hung when
it resumes.

A stop signal gives the run until shortly before the kill (`stop_allowance`,
asked of the session at each wake-up until one came): a run still going then
(a step stuck in a collective whose peer died, user code that does not
return, a save that blocks) is ended the same way, its report marked `stop`,
in whatever phase, as the kill would end it without a word. With
`hangs` false (watchdog.enabled: false) only this is watched.

When the time is up the thread calls `on_hang(HangReport)` once (the runner
dumps the stacks, records the stop and ends the process) and ends. The thread
takes no lock the training thread may hold: it reads plain attributes that
the training thread replaces whole (a tuple store is atomic under the GIL).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

# Step intervals that make up "recent" for the derived timeout.
RECENT_STEPS = 100
# The derived timeout is this many times the slowest recent step.
SLOWEST_STEP_FACTOR = 10.0
# The thread looks at the clock this often (at most), and at least 20 times per allowance.
MAX_POLL_S = 1.0
# A wake-up later than its poll by more than this (and more than a poll again) is time the
# process did not run (stopped or not scheduled): it does not count as waiting for progress.
STOP_SLACK_S = 0.25


def stopped_time(gap_s: float, poll_s: float) -> float:
    """Seconds of a watchdog wake-up's `gap_s` (asked for: `poll_s`) the process did not run.

    A thread that sleeps `poll_s` wakes within milliseconds of it while its process runs; a gap
    beyond 2 x `poll_s` + STOP_SLACK_S means the process was stopped or not scheduled for all but
    the `poll_s` it slept (a SIGSTOP lands mid-sleep at the earliest): that rest is returned.
    Smaller gaps are scheduling jitter and count in full."""
    if gap_s > 2 * poll_s + STOP_SLACK_S:
        return gap_s - poll_s
    return 0.0


def hang_timeout(recent_steps: Sequence[float], timeout_s: Optional[float], min_timeout_s: float) -> float:
    """Seconds a step may take before it counts as a hang.

    `timeout_s` when given; else max(10 x the slowest recent step, `min_timeout_s`)
    (`min_timeout_s` alone before any step was timed)."""
    if timeout_s is not None:
        return timeout_s
    slowest = max(recent_steps, default=0.0)
    return max(SLOWEST_STEP_FACTOR * slowest, min_timeout_s)


@dataclass(frozen=True)
class HangReport:
    phase: str  # "start-up", "step", "save", the name of an announced phase, or OUTSIDE_STEPS
    waited_s: float  # seconds the process could run since the last progress (stopped time not counted)
    allowed_s: float  # the allowance that ran out
    stop: bool = False  # a stop signal's allowance ran out (waited_s: since the signal), not a hang's


# The phase of a stop report after the step loop ended (or before it began).
OUTSIDE_STEPS = "code outside the step loop"


class Watchdog:
    """Owns the heartbeat and the watchdog thread of one session.

    `start(on_hang)` starts the thread; `beat()` at each step boundary; `slow_work()`
    around a save at a boundary; `stop_watching()` when the step loop ended; `close()`."""

    def __init__(self, timeout_s: Optional[float], min_timeout_s: float, startup_s: float, hangs: bool = True) -> None:
        self.hangs = hangs
        self.timeout_s = timeout_s
        self.min_timeout_s = min_timeout_s
        self.startup_s = startup_s
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        # seconds the process was stopped (found by the thread alone, which writes it; a float store is atomic)
        self._stopped_s = 0.0
        # (since, phase): progress last seen at `since` (`clock()`); phase None: not watched
        self._mark: tuple[float, Optional[str]] = (time.monotonic(), "start-up")
        self._allowances: dict[str, float] = {}  # announced phases (`phase`): name -> seconds allowed
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(
        self, on_hang: Callable[[HangReport], None], stop_allowance: Callable[[], Optional[float]] = lambda: None
    ) -> None:
        """`stop_allowance()`: None until a stop signal came, then the seconds the run has from it."""
        self._mark = (time.monotonic(), "start-up")
        self._thread = threading.Thread(
            target=self._watch, args=(on_hang, stop_allowance), name="hydra-preempt-watchdog", daemon=True
        )
        self._thread.start()

    def beat(self) -> None:
        """A step ended: the time since the previous beat is a step's duration (after a start-up or a save: not)."""
        now = time.monotonic()
        since, phase = self._mark
        if phase == "step":
            self._recent.append(now - since)
        self._mark = (now, "step")

    @contextlib.contextmanager
    def slow_work(self) -> Iterator[None]:
        """A save: allowed `startup_s`; then the phase it interrupted goes on, its clock started again
        (a save before the first step leaves the start-up allowance to that step)."""
        phase = self._mark[1]
        self._mark = (time.monotonic(), "save" if phase is not None else None)
        try:
            yield
        finally:
            self._mark = (time.monotonic(), phase)

    @contextlib.contextmanager
    def phase(self, name: str, allowed_s: Optional[float] = None) -> Iterator[None]:
        """A long phase the training function announced: allowed `allowed_s` (default `startup_s`);
        then the phase it interrupted goes on, its clock started again. Not watched before the
        steps began or after they ended, as user code there never is."""
        outer = self._mark[1]
        key = f"{name} (announced)"
        previous = self._allowances.get(key)
        self._allowances[key] = float(allowed_s) if allowed_s is not None else self.startup_s
        self._mark = (time.monotonic(), key if outer is not None else None)
        try:
            yield
        finally:
            self._mark = (time.monotonic(), outer)
            if previous is None:
                del self._allowances[key]
            else:
                self._allowances[key] = previous

    def stop_watching(self) -> None:
        """The step loop ended: what follows is the training function's own business."""
        self._mark = (time.monotonic(), None)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def allowance(self, phase: str) -> float:
        if phase == "step":
            return hang_timeout(tuple(self._recent), self.timeout_s, self.min_timeout_s)
        return self._allowances.get(phase, self.startup_s)

    def _watch(self, on_hang: Callable[[HangReport], None], stop_allowance: Callable[[], Optional[float]]) -> None:
        poll = MAX_POLL_S
        woke = time.monotonic()
        # the mark last looked at, and the seconds the process was stopped since it was set
        credit: tuple[tuple[float, Optional[str]] | None, float] = (None, 0.0)
        stop: tuple[float, float] | None = None  # (since, allowed): a stop signal came
        while not self._closed.wait(poll):
            now = time.monotonic()
            stopped = stopped_time(now - woke, poll)
            allowed_stop = stop_allowance()  # asked at each look: None again once the stop needs no watching
            if allowed_stop is None:
                stop = None
            elif stop is None or allowed_stop != stop[1]:  # new, or the kill now known (SLURM answered)
                # counted from now: the allowance is the time to the kill as known now (from the previous
                # look it would end up to a poll early, before the session's own stop gives up its waits);
                # without a known kill, `grace_s` leaves more than a poll to the launcher's
                stop = (now, allowed_stop)
            woke = now
            mark = self._mark
            since, phase = mark
            if stop is not None and now - stop[0] >= stop[1]:  # the kill's clock: stopped time counts
                if not self._closed.is_set():  # the run did not end while we looked
                    on_hang(HangReport(phase or OUTSIDE_STEPS, now - stop[0], stop[1], stop=True))
                return
            if credit[0] is not mark:
                credit = (mark, 0.0)
            if stopped and since < now - stopped / 2:  # set before the stop (else after the resume): not waited
                credit = (mark, credit[1] + stopped)
            poll = MAX_POLL_S if stop is None else max(min(MAX_POLL_S, stop[0] + stop[1] - now), 0.01)
            if phase is None or not self.hangs:
                continue
            allowed = self.allowance(phase)
            waited = now - since - credit[1]
            if waited > allowed and self._mark is mark:  # no beat came while we looked
                on_hang(HangReport(phase, waited, allowed))
                return
            poll = min(poll, allowed / 20)
