"""The step-boundary decision, exhaustively: every combination of agreed flags and the deadline verdict."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydra_preempt.outcome import Status
from hydra_preempt.session.boundary import (
    STUCK_STOP_MARGIN_S,
    Action,
    BoundaryFlags,
    agrees_at,
    decide,
    save_would_miss_deadline,
    stop_allowance,
    stop_status,
)

FIELDS = ("preempt", "cancel", "checkpoint", "periodic", "suspect", "diverged", "non_finite")
ALL_CASES = [(BoundaryFlags(*bits[:7]), bits[7]) for bits in itertools.product((False, True), repeat=8)]


@pytest.mark.parametrize("flags, miss", ALL_CASES)
def test_every_combination_obeys_the_rules(flags, miss):
    action = decide(flags, miss)
    if flags.diverged:  # nothing of a diverged state is saved, whatever else was asked
        assert action == Action(stop=Status.DIVERGED)
        return
    if flags.non_finite:  # a nan/inf state is never saved; a stop that would save it stops as diverged
        assert action.save is None and not action.skipped_for_deadline
        assert action.stop is (Status.DIVERGED if flags.preempt or flags.cancel else None)
        assert action.deferred == flags.periodic
        assert action.unsaved_non_finite == (flags.preempt or flags.cancel or flags.checkpoint or flags.periodic)
        return
    # a stop is exactly what the signals asked for; a cancel outranks a preemption
    expected_stop = Status.CANCELLED if flags.cancel else Status.PREEMPTED if flags.preempt else None
    assert action.stop is expected_stop
    # a due periodic save is deferred while the loss spikes, and only then
    assert action.deferred == (flags.periodic and flags.suspect)
    if action.stop is not None and miss:  # a stop whose save could not finish: no save at all
        assert action.save is None and action.skipped_for_deadline
        return
    assert not action.skipped_for_deadline
    if flags.preempt:
        assert action.save == "preempt"
    elif flags.cancel or flags.checkpoint:
        assert action.save == "manual"
    elif flags.periodic and not flags.suspect:
        assert action.save == "periodic"
    else:
        assert action.save is None


@pytest.mark.parametrize(
    "flags, miss, action",
    [
        (BoundaryFlags(), False, Action()),
        (BoundaryFlags(periodic=True), False, Action(save="periodic")),
        (BoundaryFlags(periodic=True, suspect=True), False, Action(deferred=True)),
        (BoundaryFlags(checkpoint=True, suspect=True), False, Action(save="manual")),
        (BoundaryFlags(preempt=True, periodic=True), False, Action(save="preempt", stop=Status.PREEMPTED)),
        (BoundaryFlags(preempt=True, cancel=True), False, Action(save="preempt", stop=Status.CANCELLED)),
        (BoundaryFlags(cancel=True), False, Action(save="manual", stop=Status.CANCELLED)),
        (BoundaryFlags(preempt=True), True, Action(stop=Status.PREEMPTED, skipped_for_deadline=True)),
        (BoundaryFlags(checkpoint=True), True, Action(save="manual")),  # no stop: the deadline does not apply
        (BoundaryFlags(preempt=True, diverged=True), True, Action(stop=Status.DIVERGED)),
        (BoundaryFlags(periodic=True, non_finite=True), False, Action(deferred=True, unsaved_non_finite=True)),
        (BoundaryFlags(preempt=True, non_finite=True), False, Action(stop=Status.DIVERGED, unsaved_non_finite=True)),
        (BoundaryFlags(non_finite=True), False, Action()),
    ],
)
def test_the_table(flags, miss, action):
    assert decide(flags, miss) == action


def test_the_deadline_matters_only_for_a_stop_that_saves():
    for flags, _ in ALL_CASES:
        assert flags.stopping == ((flags.preempt or flags.cancel) and not flags.diverged and not flags.non_finite)
        if not flags.stopping:
            assert decide(flags, True) == decide(flags, False)


@given(
    left=st.none() | st.floats(-100, 1e4, allow_nan=False),
    last=st.none() | st.floats(0, 1e3, allow_nan=False),
    has_checkpoint=st.booleans(),
)
def test_a_save_is_skipped_only_with_a_checkpoint_and_a_known_deadline(left, last, has_checkpoint):
    miss = save_would_miss_deadline(left, last, has_checkpoint)
    if miss:
        assert has_checkpoint and left is not None and last is not None and 1.5 * last + 1.0 > left
    elif has_checkpoint and left is not None and last is not None:
        assert 1.5 * last + 1.0 <= left


def test_stop_status_and_agreement_points():
    assert stop_status(False, False) is None
    assert stop_status(True, True) is Status.CANCELLED
    assert [s for s in range(1, 13) if agrees_at(s, 4, 3)] == [3, 6, 9, 12]
    assert all(agrees_at(s, 1, 3) for s in range(1, 13))


def test_a_stop_is_allowed_until_shortly_before_the_kill_the_scheduler_tells_else_the_grace():
    assert stop_allowance(100.0, 25.0, 1.0) == 100.0 - STUCK_STOP_MARGIN_S  # the kill as read now
    assert stop_allowance(None, 25.0, 1.0) == 24.0 - STUCK_STOP_MARGIN_S  # the signal came up to a look ago
    assert stop_allowance(0.2, 25.0, 1.0) == 0.0  # the kill is due: end now
    assert STUCK_STOP_MARGIN_S >= 2.0  # time for the stacks, scontrol, the stop record and the requeue
