"""A process whose run finished exits 0: nothing the library started is left inside torch while the
interpreter shuts down (that aborts it with SIGABRT, "terminate called without an active exception").

A few repeats here, at CI's cost; `make exit-check` runs 200 single-process runs and 100 of 2 ranks
(tests/integration/exit_repeat.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hydra_preempt import SessionConfig, Status, run
from tests.integration.exit_repeat import train

ROOT = Path(__file__).resolve().parents[2]


def test_run_returns_with_no_thread_of_its_own_left(tmp_path, monkeypatch):
    """The watchdog, the checkpoint writer (a background save in flight at the end) and the signal
    machinery have ended when run() returns: the cause of an abort at exit, checked directly."""
    from hydra_preempt.checkpoint import checkpointer

    serve = checkpointer._Writer._serve

    def slow_to_end(jobs):  # the thread outlives its last write a while (releasing buffers, say)
        serve(jobs)
        time.sleep(0.5)

    monkeypatch.setattr(checkpointer._Writer, "_serve", staticmethod(slow_to_end))
    monkeypatch.setenv("EXIT_REPEAT_WORKERS", "1")
    before = set(threading.enumerate())
    config = SessionConfig.from_mapping({"checkpoint": {"every_steps": 1, "async_save": True}})
    outcome = run(train, tmp_path, config)
    assert outcome.status is Status.FINISHED
    assert [t.name for t in threading.enumerate() if t not in before] == []
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
@pytest.mark.parametrize("ranks, workers, runs", [(1, 1, 12), (2, 0, 6)])
def test_finished_runs_exit_zero_every_time(ranks, workers, runs):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.exit_repeat",
            f"--runs={runs}",
            f"--ranks={ranks}",
            f"--workers={workers}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert f"{runs * ranks} processes exited 0" in done.stdout
