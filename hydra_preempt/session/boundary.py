"""The step-boundary decision: what to do once a step has finished, as a pure function of plain values.

The session gathers the inputs (signal requests, whether a periodic save is
due, the divergence verdict, agreed over all ranks) into `BoundaryFlags`,
asks `decide`, and only executes the `Action` it returns:

    diverged                   -> stop DIVERGED, no save (the state is bad)
    a watched metric is not finite (nan/inf): no save of this state; a preempt or cancel
                               -> stop DIVERGED (a NaN state saved for a requeue is worse than
                                  the steps lost since the last good checkpoint)
    cancel (SIGINT)            -> save "manual", stop CANCELLED
    preempt (TERM/USR2/HUP)    -> save "preempt", stop PREEMPTED
    checkpoint (SIGUSR1)       -> save "manual", go on
    periodic due               -> save "periodic", go on; deferred while the loss spikes
    a stop whose save would not finish before the kill, when a checkpoint exists
                               -> stop without saving (the last checkpoint stands)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..outcome import Status

# A save is judged by the last one: this factor and margin cover a slower disk this time.
DEADLINE_FACTOR = 1.5
DEADLINE_MARGIN_S = 1.0
# A run that has not reached a step boundary this long before the kill is ended by the watchdog thread
# (`stop_allowance`): time to dump the stacks, ask SLURM what the stop was, write the stop and requeue
# (each scontrol call may take a second on a busy controller). Once the training thread takes the stop
# at a boundary, its own deadlines govern (DEADLINE_MARGIN_S) and the watchdog leaves it alone.
STUCK_STOP_MARGIN_S = 3.0


@dataclass(frozen=True)
class BoundaryFlags:
    """What the ranks agreed on at a step boundary (each flag: true on any rank)."""

    preempt: bool = False
    cancel: bool = False
    checkpoint: bool = False
    periodic: bool = False
    suspect: bool = False  # the loss spiked at this step: do not trust this state for a periodic save
    diverged: bool = False
    non_finite: bool = False  # a watched metric's latest value is nan/inf: this state is never saved

    @property
    def stopping(self) -> bool:
        """A stop that saves first: only then does the deadline matter."""
        return (self.preempt or self.cancel) and not self.diverged and not self.non_finite


@dataclass(frozen=True)
class Action:
    save: str | None = None  # checkpoint reason: "preempt", "manual" or "periodic"; None: no save
    stop: Status | None = None  # after the save, if any
    deferred: bool = False  # a due periodic save waits (loss spike); it stays pending
    unsaved_non_finite: bool = False  # a save was due but this state is not finite: not made
    skipped_for_deadline: bool = False  # a stop without its save: it would not finish before the kill


def decide(flags: BoundaryFlags, save_would_miss_deadline: bool = False) -> Action:
    if flags.diverged:
        return Action(stop=Status.DIVERGED)
    if flags.non_finite:
        stop = Status.DIVERGED if flags.preempt or flags.cancel else None
        due = flags.preempt or flags.cancel or flags.checkpoint or flags.periodic
        return Action(stop=stop, deferred=flags.periodic, unsaved_non_finite=due)
    deferred = flags.periodic and flags.suspect
    periodic = flags.periodic and not flags.suspect
    stop = stop_status(flags.preempt, flags.cancel)
    save = (
        "preempt"
        if flags.preempt
        else "manual"
        if flags.cancel or flags.checkpoint
        else "periodic"
        if periodic
        else None
    )
    if stop is not None and save_would_miss_deadline:
        return Action(stop=stop, deferred=deferred, skipped_for_deadline=True)
    return Action(save=save, stop=stop, deferred=deferred)


def stop_status(preempt: bool, cancel: bool) -> Status | None:
    """A cancel outranks a preemption: the user asked not to requeue."""
    return Status.CANCELLED if cancel else Status.PREEMPTED if preempt else None


def agrees_at(step: int, world_size: int, sync_every: int) -> bool:
    """Whether the ranks agree at this boundary; between agreements requests stay pending."""
    return world_size == 1 or step % sync_every == 0


def save_would_miss_deadline(seconds_left: float | None, last_save_s: float | None, has_checkpoint: bool) -> bool:
    """True if a checkpoint exists and the next save, judged by the last one, would not finish in time."""
    if seconds_left is None or last_save_s is None or not has_checkpoint:
        return False
    return save_estimate_s(last_save_s) > seconds_left


def stop_allowance(seconds_left: float | None, grace_s: float, look_s: float) -> float:
    """Seconds a run has, counted from when the watchdog (looking every `look_s` at most) learns of a stop
    signal, to end before the watchdog thread ends it with nothing saved: until shortly before the kill.
    `seconds_left` when the scheduler tells it (exact: it is read then); else `grace_s` from the signal,
    which came up to a look earlier."""
    left = seconds_left if seconds_left is not None else grace_s - look_s
    return max(left - STUCK_STOP_MARGIN_S, 0.0)


def save_estimate_s(last_save_s: float) -> float:
    return DEADLINE_FACTOR * last_save_s + DEADLINE_MARGIN_S
