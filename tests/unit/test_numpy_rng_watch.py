"""NumPy's global generator state read only when it moved: every way a state can change is seen."""

import numpy as np
import pytest

from hydra_preempt.session.state import NumpyRngWatch

CHANGES = {
    "uniform draws": lambda: np.random.rand(3),
    "a reseed": lambda: np.random.seed(123),
    "set_state": lambda: np.random.set_state(np.random.RandomState(7).get_state()),
    "a gaussian pair (caches the second)": lambda: np.random.standard_normal(),
    "the cached gaussian (words unchanged)": lambda: np.random.standard_normal(),
    "a shuffle": lambda: np.random.shuffle(np.arange(10)),
}


def same(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


@pytest.mark.parametrize("sequence", [list(CHANGES), list(reversed(CHANGES))])
def test_every_change_is_seen_and_an_unchanged_state_is_not_read_again(sequence):
    np.random.seed(0)
    watch = NumpyRngWatch()
    first = watch.state()
    assert watch.state() is first  # unchanged: the state read before
    for name in sequence:
        CHANGES[name]()
        assert same(watch.state(), np.random.get_state()), name
        assert same(watch.state(), np.random.get_state()), name  # and again, unchanged


def test_a_replaced_bit_generator_is_followed():
    np.random.seed(0)
    watch = NumpyRngWatch()
    watch.state()
    old = np.random.get_bit_generator()
    try:
        np.random.set_bit_generator(np.random.MT19937(0))  # another object, same seed: other words
        assert same(watch.state(), np.random.get_state())
        np.random.rand(2)
        assert same(watch.state(), np.random.get_state())
    finally:
        np.random.set_bit_generator(old)
    assert same(watch.state(), np.random.get_state())


def test_a_generator_other_than_mt19937_is_read_every_time_without_reading_past_its_state():
    old = np.random.get_bit_generator()
    watch = NumpyRngWatch()
    try:
        np.random.set_bit_generator(np.random.PCG64(1))
        with pytest.warns(RuntimeWarning):  # NumPy: get_state() of a generator other than MT19937
            first = watch.state()
        with pytest.warns(RuntimeWarning):
            assert watch.state() == first and watch.state() is not first  # read again, unchanged
        np.random.rand(2)
        with pytest.warns(RuntimeWarning):
            assert watch.state() != first
    finally:
        np.random.set_bit_generator(old)
