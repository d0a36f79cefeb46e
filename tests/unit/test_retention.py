"""Retention invariants over random metric sequences (hypothesis)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra_preempt.checkpoint.retention import CheckpointRecord, RetentionPolicy
from hydra_preempt.config import SessionConfig
from hydra_preempt.errors import ConfigError

REASONS = ["periodic", "periodic", "periodic", "preempt", "manual", "emergency", "final"]

metric_values = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.just(math.nan),
    st.just(math.inf),
    st.none(),
)
saves = st.lists(st.tuples(metric_values, st.sampled_from(REASONS)), min_size=1, max_size=60)
policies = st.builds(
    RetentionPolicy,
    keep_last=st.integers(1, 5),
    keep_best=st.integers(0, 4),
    metric=st.just("loss"),
    mode=st.sampled_from(["min", "max"]),
)


def simulate(policy, sequence):
    """Save one checkpoint per element, applying the policy after each save like the store does.

    Yields (on_disk_before_save, new_record, plan) after every save.
    """
    on_disk = []
    for step, (value, reason) in enumerate(sequence, start=1):
        metrics = {} if value is None else {"loss": value}
        record = CheckpointRecord(step, reason, metrics)
        before = list(on_disk)
        on_disk.append(record)
        plan = policy.plan(on_disk)
        on_disk = [r for r in on_disk if r.step not in plan.delete]
        yield before, record, plan, on_disk


def true_best(policy, records):
    eligible = [(r.metrics["loss"], r.step) for r in records if policy.metric_of(r) is not None]
    eligible.sort(key=lambda vs: (vs[0] if policy.mode == "min" else -vs[0], vs[1]))
    return [s for _, s in eligible[: policy.keep_best]]


@settings(max_examples=300, deadline=None)
@given(policies, saves)
def test_invariants_hold_after_every_save(policy, sequence):
    all_records = []
    for before, record, plan, on_disk in simulate(policy, sequence):
        all_records.append(record)
        steps = [r.step for r in on_disk]
        # at most K + N on disk
        assert len(on_disk) <= policy.keep_last + policy.keep_best
        # the newest checkpoint is never deleted
        assert record.step in steps
        # the best N among what was on disk are all kept, and best is the real best
        assert list(plan.best) == true_best(policy, before + [record])
        assert set(plan.best) <= set(steps)
        # the last K saved are kept
        assert set(range(max(1, record.step - policy.keep_last + 1), record.step + 1)) <= set(steps)
        # nothing deleted that the plan keeps, no step both kept and deleted
        assert not set(plan.keep) & set(plan.delete)


@settings(max_examples=300, deadline=None)
@given(policies, saves)
def test_a_best_checkpoint_is_never_deleted(policy, sequence):
    """A checkpoint deleted at save t was not among the best N of what was on disk at save t."""
    for before, record, plan, _ in simulate(policy, sequence):
        deleted = set(plan.delete)
        assert not deleted & set(true_best(policy, before + [record]))


@settings(max_examples=200, deadline=None)
@given(policies, saves)
def test_emergency_and_non_finite_are_never_best(policy, sequence):
    for _, _, plan, on_disk in simulate(policy, sequence):
        by_step = {r.step: r for r in on_disk}
        for step in plan.best:
            r = by_step[step]
            assert r.reason != "emergency"
            assert math.isfinite(r.metrics["loss"])


def test_best_is_sorted_best_first():
    records = [CheckpointRecord(s, "periodic", {"acc": a}) for s, a in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.1)]]
    assert RetentionPolicy(1, 2, "acc", "max").plan(records).best == (2, 3)
    assert RetentionPolicy(1, 2, "acc", "min").plan(records).best == (4, 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep_last=0), "keep_last"),
        (dict(keep_best=-1), "keep_best"),
        (dict(keep_best=2, metric=None), "checkpoint.metric"),
        (dict(mode="median"), "mode"),
    ],
)
def test_invalid_policy_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SessionConfig.from_mapping({"checkpoint": {"keep_last": 3, **kwargs}})
