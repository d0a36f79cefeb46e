"""Python's `random` state read only when it moved: every way a state can change is seen, and where
the cheap comparison cannot be trusted the state is read every time."""

import random

import pytest

from hydra_preempt.session.state import PythonRngWatch

CHANGES = {
    "uniform draws": lambda: random.random(),
    "a reseed": lambda: random.seed(123),
    "a reseed to the same seed": lambda: random.seed(123),
    "setstate": lambda: random.setstate(random.Random(7).getstate()),
    "a gaussian pair (caches the second)": lambda: random.gauss(0.0, 1.0),
    "the cached gaussian (words unchanged)": lambda: random.gauss(0.0, 1.0),
    "a gaussian cached again": lambda: random.gauss(0.0, 1.0),
    "setstate with a cached gaussian of the same words": lambda: random.setstate((3, random.getstate()[1], 0.5)),
    "a shuffle": lambda: random.shuffle(list(range(10))),
    "getrandbits": lambda: random.getrandbits(64),
    "one word drawn (the index moves)": lambda: random.getrandbits(32),
}


@pytest.fixture(autouse=True)
def restore_random():
    state = random.getstate()
    yield
    random.setstate(state)


@pytest.mark.parametrize("sequence", [list(CHANGES), list(reversed(CHANGES))])
def test_every_change_is_seen_and_an_unchanged_state_is_not_read_again(sequence):
    random.seed(0)
    watch = PythonRngWatch()
    first = watch.state()
    assert first == random.getstate()
    assert watch.state() is first  # unchanged: the state read before
    for name in sequence:
        CHANGES[name]()
        assert watch.state() == random.getstate(), name
        again = watch.state()
        assert again == random.getstate() and watch.state() is again, name  # unchanged: not read again


def test_the_layout_is_checked_on_this_interpreter():
    """On CPython the raw words are what getstate() shows: the shortcut is in use (else every check
    above would pass by reading the state every time, and nothing would be faster)."""
    watch = PythonRngWatch()
    watch.state()
    assert watch._words is not None


def test_a_layout_that_does_not_match_getstate_reads_the_state_every_time(monkeypatch):
    # Words first, then the index, would read the same 625 values as CPython's layout whenever the
    # last word is below 2**31 (half of all states): a layout one word short never matches.
    monkeypatch.setattr(PythonRngWatch, "_LAYOUT", "=i623I")
    watch = PythonRngWatch()
    first = watch.state()
    assert watch._words is None
    assert watch.state() == first and watch.state() is not first  # read again, unchanged
    random.random()
    assert watch.state() == random.getstate()


def test_a_module_getstate_bound_to_another_generator_is_followed(monkeypatch):
    watch = PythonRngWatch()
    random.seed(5)
    watch.state()
    other = random.Random(5)  # the same words: only gauss_next tells them apart
    other.gauss(0.0, 1.0)
    other.seed(5)
    other.gauss_next = 0.25
    monkeypatch.setattr(random, "getstate", other.getstate)
    assert watch.state() == other.getstate()
    other.random()
    assert watch.state() == other.getstate()


class _Subclass(random.Random):
    def getstate(self):
        return ("mine", super().getstate())


def test_a_generator_that_is_not_random_random_reads_the_state_every_time(monkeypatch):
    generator = _Subclass(3)
    monkeypatch.setattr(random, "getstate", generator.getstate)
    watch = PythonRngWatch()
    assert watch.state() == generator.getstate()
    generator.random()
    assert watch.state() == generator.getstate()
    monkeypatch.setattr(random, "getstate", lambda: "replaced")
    assert watch.state() == "replaced"
