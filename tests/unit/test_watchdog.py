"""The hang timeout (pure) and the watchdog thread with a recording on_hang (no process ends)."""

import signal
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydra_preempt.config import SessionConfig
from hydra_preempt.errors import ConfigError
from hydra_preempt.session.signals import Request, SignalRequests
from hydra_preempt.session.watchdog import (
    OUTSIDE_STEPS,
    STOP_SLACK_S,
    HangReport,
    Watchdog,
    hang_timeout,
    stopped_time,
)


def test_timeout_is_the_configured_one_when_given():
    assert hang_timeout([5.0, 900.0], 3.0, 600.0) == 3.0


def test_timeout_is_the_floor_before_any_step_and_for_fast_steps():
    assert hang_timeout([], None, 600.0) == 600.0
    assert hang_timeout([0.1, 2.0, 0.5], None, 600.0) == 600.0


def test_timeout_is_ten_times_the_slowest_recent_step_above_the_floor():
    assert hang_timeout([30.0, 95.0, 40.0], None, 600.0) == 950.0


@given(st.lists(st.floats(0, 1e5), max_size=50), st.floats(1, 1e4))
def test_derived_timeout_never_below_the_floor_nor_ten_steps(steps, floor):
    timeout = hang_timeout(steps, None, floor)
    assert timeout >= floor and all(timeout >= 10 * s for s in steps)


def hang_reports(watchdog):
    reports: list[HangReport] = []
    fired = threading.Event()

    def on_hang(report):
        reports.append(report)
        fired.set()

    watchdog.start(on_hang)
    return reports, fired


def test_no_beat_within_the_step_timeout_is_a_hang_of_the_step():
    dog = Watchdog(0.2, 600.0, 30.0)
    reports, fired = hang_reports(dog)
    for _ in range(5):
        dog.beat()
        time.sleep(0.02)
    assert fired.wait(5)
    dog.close()
    [report] = reports
    assert report.phase == "step" and report.allowed_s == 0.2 and report.waited_s > 0.2


def test_start_up_has_its_own_allowance():
    dog = Watchdog(0.05, 600.0, 0.3)
    reports, fired = hang_reports(dog)
    time.sleep(0.15)  # longer than a step may take: still starting up
    assert not fired.is_set()
    assert fired.wait(5)
    dog.close()
    assert reports[0].phase == "start-up" and reports[0].allowed_s == 0.3


def test_a_save_is_allowed_the_long_allowance_and_the_step_clock_restarts_after_it():
    dog = Watchdog(0.1, 600.0, 30.0)
    reports, _ = hang_reports(dog)
    dog.beat()
    with dog.slow_work():
        time.sleep(0.3)
    dog.beat()
    dog.stop_watching()
    time.sleep(0.3)
    dog.close()
    assert reports == []
    assert list(dog._recent) and max(dog._recent) < 0.1  # the save is not a step's duration


def test_a_save_before_the_first_step_leaves_it_the_start_up_allowance():
    dog = Watchdog(0.05, 600.0, 0.5)
    reports, fired = hang_reports(dog)
    with dog.slow_work():
        pass
    time.sleep(0.2)  # the first step, slower than a step may be
    dog.beat()
    dog.stop_watching()
    dog.close()
    assert reports == [] and not fired.is_set()


def test_a_stop_not_ended_within_its_allowance_is_reported_in_any_phase_even_with_hangs_off():
    dog = Watchdog(0.05, 600.0, 0.05, hangs=False)
    requested = threading.Event()
    reports, fired = [], threading.Event()

    def on_hang(report):
        reports.append(report)
        fired.set()

    dog.start(on_hang, lambda: 0.3 if requested.is_set() else None)
    dog.beat()
    dog.stop_watching()  # after the step loop: no hang is watched, a stop still is
    time.sleep(0.2)
    assert not fired.is_set()
    requested.set()
    asked = time.monotonic()
    assert fired.wait(5)
    dog.close()
    [report] = reports
    assert report.stop and report.phase == OUTSIDE_STEPS and report.allowed_s == 0.3
    assert report.waited_s >= 0.3 and time.monotonic() - asked < 1.5  # counted from the look before it came


def test_a_run_that_ends_within_its_stop_allowance_is_not_reported():
    dog = Watchdog(600.0, 600.0, 600.0)
    reports: list[HangReport] = []
    dog.start(reports.append, lambda: 0.5)
    dog.beat()
    time.sleep(0.2)
    dog.close()  # the run ended
    time.sleep(0.5)
    assert reports == []


def test_after_the_step_loop_nothing_is_watched():
    dog = Watchdog(0.05, 600.0, 0.05)
    reports, _ = hang_reports(dog)
    dog.beat()
    dog.stop_watching()
    time.sleep(0.3)
    dog.close()
    assert reports == []


@pytest.mark.parametrize("key", ["timeout_s", "min_timeout_s", "startup_s"])
def test_a_non_positive_watchdog_time_is_refused_with_its_key(key):
    with pytest.raises(ConfigError, match=f"watchdog.{key} must be > 0"):
        SessionConfig.from_mapping({"watchdog": {key: 0}})


def test_a_wake_up_on_time_or_with_jitter_counts_in_full():
    assert stopped_time(1.0, 1.0) == 0.0
    assert stopped_time(0.16, 0.15) == 0.0
    assert stopped_time(2 * 0.15 + STOP_SLACK_S, 0.15) == 0.0


def test_a_wake_up_long_after_its_poll_is_time_stopped_less_the_poll():
    assert stopped_time(8.15, 0.15) == pytest.approx(8.0)  # SIGSTOP for 8 s during a 0.15 s poll
    assert stopped_time(601.0, 1.0) == pytest.approx(600.0)


@given(st.floats(0, 1e6), st.floats(0.001, 1.0))
def test_stopped_time_never_exceeds_the_gap_beyond_the_poll(gap, poll):
    stopped = stopped_time(gap, poll)
    assert 0.0 <= stopped <= max(gap - poll, 0.0)


class JumpingClock:
    """time.monotonic() that leaps forward on demand, as the watchdog sees a process that was stopped."""

    def __init__(self):
        self.offset = 0.0

    def monotonic(self):
        return time.monotonic() + self.offset


def jumping_dog(monkeypatch):
    """A watchdog (0.5 s per step) whose clock leaps when told, after a first beat."""
    import hydra_preempt.session.watchdog as module

    clock = JumpingClock()
    monkeypatch.setattr(module, "time", clock)
    dog = Watchdog(0.5, 600.0, 30.0)
    reports, fired = hang_reports(dog)
    dog.beat()
    return clock, dog, reports, fired


def test_a_beat_right_after_a_stop_is_waited_from_and_a_later_hang_found_in_running_time(monkeypatch):
    clock, dog, reports, fired = jumping_dog(monkeypatch)
    clock.offset += 30.0  # stopped for 30 s while it waited ...
    dog.beat()  # ... and the training thread beats before the watchdog thread wakes
    began = time.monotonic()
    assert fired.wait(10)  # then hangs: found after its 0.5 s, not after 30.5 s
    dog.close()
    assert time.monotonic() - began < 5 and reports[0].waited_s < 5


def test_progress_seen_before_a_stop_is_not_a_hang_when_the_process_resumes(monkeypatch):
    clock, dog, reports, fired = jumping_dog(monkeypatch)
    clock.offset += 30.0  # stopped for 30 s in the middle of a step
    time.sleep(0.2)  # the watchdog wakes (every 25 ms) and sees the gap: the step has run ~0.2 s
    dog.beat()
    dog.stop_watching()
    dog.close()
    assert reports == [] and not fired.is_set()


def test_another_thread_reads_a_stop_signal_from_the_wakeup_pipe_and_a_checkpoint_signal_is_no_stop():
    requests = SignalRequests("TERM", "USR2")
    requests.install()
    try:
        assert requests.arrived() is None
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)  # a checkpoint request: not a stop
        seen: list = []
        looker = threading.Thread(target=lambda: seen.append(requests.arrived()))
        # read from the pipe the C handler wrote, on a thread of its own, as the watchdog does
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)
        looker.start()
        looker.join()
        assert seen == [(Request.PREEMPT, signal.SIGUSR2)]
    finally:
        requests.uninstall()
    assert signal.set_wakeup_fd(-1) == -1  # uninstall gave the wakeup fd back
