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
