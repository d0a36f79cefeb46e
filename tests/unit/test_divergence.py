import math

import pytest

from hydra_preempt.errors import ConfigError
from hydra_preempt.session.divergence import LossSpikeDetector, Verdict


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
    with pytest.raises(ConfigError):
        LossSpikeDetector(**{**dict(window=5, factor=2.0, patience=2, min_history=3), **kwargs})
