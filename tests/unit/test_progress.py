"""The progress line: its text, and when and where a Progress prints it."""

import io
import logging

from hydra_preempt.session.progress import Progress, format_progress


def test_format_progress_says_step_rate_eta_and_the_last_checkpoint():
    assert (
        format_progress(120, 300, 12.5, 100, 3.2)
        == "step 120/300 (40%) 12.5 steps/s ETA 0:14 | checkpoint step 100, 0:03 ago"
    )
    assert format_progress(5, 10, None, None, None) == "step 5/10 (50%) ? steps/s ETA ? | no checkpoint yet"
    assert "ETA 2:46:40" in format_progress(0, 10000, 1.0, None, None)
    bar = format_progress(150, 300, 10.0, 100, 3725.0, bar=True)
    assert bar.startswith("[##########..........] step 150/300 (50%)") and bar.endswith("1:02:05 ago")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_go_to_the_log_once_per_period_without_control_characters(caplog):
    clock = Clock()
    progress = Progress(30.0, io.StringIO(), clock=clock, wall=lambda: 1000.0)
    progress.start(10)  # resumed at step 10
    with caplog.at_level(logging.INFO, logger="hydra_preempt"):
        for step in range(11, 80):
            clock.now += 1.0
            progress.update(step, 200, 50, 990.0)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "step 40/200 (20%) 1 steps/s ETA 2:40 | checkpoint step 50, 0:10 ago",
        "step 70/200 (35%) 1 steps/s ETA 2:10 | checkpoint step 50, 0:10 ago",
    ]
    assert not any(c in "".join(lines) for c in "\r\x1b")


def test_a_terminal_gets_a_live_bar_rewritten_in_place_and_ended_with_a_newline(caplog):
    clock, tty = Clock(), Tty()
    progress = Progress(30.0, tty, clock=clock)
    progress.start(0)
    with caplog.at_level(logging.INFO, logger="hydra_preempt"):
        for step in range(1, 5):
            clock.now += 0.3
            progress.update(step, 4, None, None)
        progress.close()
    assert caplog.records == []
    drawn = tty.getvalue()
    assert drawn.count("\r") == 4 and drawn.endswith("no checkpoint yet\x1b[K\n")
    assert "\r[####################] step 4/4 (100%)" in drawn
