import math

import pytest

from hydra_preempt.checkpoint.retention import CheckpointRecord
from hydra_preempt.config import SessionConfig
from hydra_preempt.errors import ConfigError
from hydra_preempt.session.divergence import HealthRule, LossSpikeDetector, Verdict


def feed(detector, values, start=1):
    return [detector.update(v, s) for s, v in enumerate(values, start=start)]


def test_decreasing_loss_never_fires():
    d = LossSpikeDetector(window=10, factor=2.0, patience=3, min_history=3)
    assert set(feed(d, [5.0 / (1 + 0.1 * i) for i in range(200)])) == {Verdict.OK}


def test_a_short_spike_is_suspect_then_recovers():
    d = LossSpikeDetector(window=10, factor=2.0, patience=3, min_history=3)
    verdicts = feed(d, [1.0] * 10 + [5.0, 5.0] + [1.0] * 5)
    assert verdicts[10:12] == [Verdict.SUSPECT, Verdict.SUSPECT]
    assert verdicts[12:] == [Verdict.OK] * 5
    assert d.spikes_in_a_row == 0


def test_patience_spikes_in_a_row_diverge_and_stay_diverged():
    d = LossSpikeDetector(window=10, factor=2.0, patience=3, min_history=3)
    verdicts = feed(d, [2.8] * 10 + [8.0] * 3 + [1.0])
    assert verdicts[10:] == [Verdict.SUSPECT, Verdict.SUSPECT, Verdict.DIVERGED, Verdict.DIVERGED]
    assert "step 13" in d.diverged_reason and "8" in d.diverged_reason


def test_spikes_do_not_raise_the_baseline():
    d = LossSpikeDetector(window=5, factor=2.0, patience=100, min_history=3)
    feed(d, [1.0] * 5 + [3.0] * 50)
    assert d.baseline == 1.0


def test_non_finite_loss_counts_as_a_spike_even_before_history():
    d = LossSpikeDetector(window=5, factor=2.0, patience=2, min_history=3)
    assert feed(d, [math.nan, math.inf]) == [Verdict.SUSPECT, Verdict.DIVERGED]
    assert "not finite" in d.diverged_reason


def test_negative_losses_use_the_absolute_baseline():
    d = LossSpikeDetector(window=5, factor=2.0, patience=1, min_history=3)
    assert set(feed(d, [-10.0] * 5 + [-0.5])) == {Verdict.OK}  # within -10 + 10
    assert d.update(0.5, 7) is Verdict.DIVERGED


def test_state_round_trip_continues_identically():
    values = [3.0] * 8 + [9.0, 9.0] + [3.0] * 3 + [9.0] * 4
    whole = LossSpikeDetector(window=6, factor=2.0, patience=3, min_history=3)
    expected = feed(whole, values)
    first = LossSpikeDetector(window=6, factor=2.0, patience=3, min_history=3)
    got = feed(first, values[:9])
    second = LossSpikeDetector(window=6, factor=2.0, patience=3, min_history=3)
    second.load_state_dict(first.state_dict())
    got += feed(second, values[9:], start=10)
    assert got == expected


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(patience=0), dict(factor=1.0), dict(min_history=0)])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ConfigError, match=r"divergence\."):
        SessionConfig.from_mapping({"divergence": kwargs})


# -- which checkpoint a diverged run resumes from ------------------------------------


def records(*step_loss):
    return [CheckpointRecord(step, "periodic", {} if loss is None else {"loss": loss}) for step, loss in step_loss]


def test_a_warm_up_explosion_makes_every_later_checkpoint_suspect():
    d = LossSpikeDetector(window=10, factor=2.0, patience=3, min_history=5)
    feed(d, [1.0, 0.9, 0.8, 3e28, 5e28, math.nan, math.nan, math.nan])  # warm-up takes 3e28 unjudged
    assert d.diverged_reason and d.streak_start == 6
    rule = d.health_rule()
    assert rule.first_suspect == 4  # 3e28 is a spike in hindsight
    saved = records((1, 1.0), (2, 0.9), (3, 0.8), (4, 3e28), (5, 5e28))
    # step 3's state produced the 3e28 of step 4: suspect, though its own loss is fine
    assert [r.step for r in rule.suspect_tail(saved, "loss")] == [3, 4, 5]


def test_a_spike_after_warm_up_sets_aside_the_state_that_produced_it_only():
    d = LossSpikeDetector(window=20, factor=2.0, patience=3, min_history=3)
    feed(d, [3.0 - 0.01 * i for i in range(30)] + [8.0] * 3)  # spikes at steps 31-33
    rule = d.health_rule()
    assert rule.first_suspect == 31
    assert [r.step for r in rule.suspect_tail(records((10, 2.9), (20, 2.8), (30, 2.7)), "loss")] == [30]
    assert [r.step for r in rule.suspect_tail(records((10, 2.9), (20, 2.8), (29, 2.7)), "loss")] == []


def test_a_checkpoint_whose_own_value_is_a_spike_is_not_healthy_and_older_ones_stay():
    rule = HealthRule(first_suspect=None, limit=4.0)
    assert [r.step for r in rule.suspect_tail(records((10, 3.0), (20, 9.0), (30, None)), "loss")] == []
    assert [r.step for r in rule.suspect_tail(records((10, 3.0), (20, 9.0)), "loss")] == [20]
    assert [r.step for r in rule.suspect_tail(records((10, 9.0), (20, 3.0)), "loss")] == []  # older: not touched


def test_a_non_finite_metric_the_detector_does_not_watch_also_marks_the_start():
    d = LossSpikeDetector(window=5, factor=2.0, patience=3, min_history=3)
    feed(d, [1.0] * 10)
    assert d.health_rule().first_suspect is None
    assert d.health_rule(non_finite_since=7).first_suspect == 7


def test_state_round_trip_keeps_what_the_health_rule_needs_and_old_states_load():
    d = LossSpikeDetector(window=10, factor=2.0, patience=5, min_history=3)
    feed(d, [1.0, 50.0, 1.0, 1.0, 9.0])
    again = LossSpikeDetector(window=10, factor=2.0, patience=5, min_history=3)
    again.load_state_dict(d.state_dict())
    assert again.health_rule() == d.health_rule() and again.health_rule().first_suspect == 2
    old = {k: v for k, v in d.state_dict().items() if k in ("history", "spikes_in_a_row", "diverged_reason")}
    again.load_state_dict(old)
    assert again.health_rule().first_suspect is None
