"""A full disk under the run directory's own logs (metrics.jsonl, run_log.jsonl, result.json): one clear
line for each, no traceback, no training lost. A real tmpfs, filled while the run is going on."""

import errno
import json
import logging
import os

import pytest
import torch

from hydra_preempt import ExitCode, SessionConfig, Status, run
from hydra_preempt.checkpoint.store import CheckpointStore
from hydra_preempt.rundir import METRICS_LOG, RUN_LOG, read_events, read_metrics, read_result

PAGE = 4096
FILL_AT = 5
STEPS = 20


def pad_to_a_page(path):
    """Append one JSON line so that the file ends on a page boundary: its next line needs a new page."""
    need = -path.stat().st_size % PAGE
    need += PAGE if need < 16 else 0
    line = json.dumps({"pad": "x" * (need - len('{"pad": ""}') - 1)}) + "\n"
    with open(path, "a") as f:
        f.write(line)
    assert path.stat().st_size % PAGE == 0


def fill(directory):
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def training(run_dir, fill_at=None):
    def train(session):
        model = torch.nn.Linear(2, 1)
        session.register(model=model)
        session.restore()
        for step in session.steps(STEPS):
            with torch.no_grad():
                model.weight.add_(0.01)
            session.report(loss=1.0 / (step + 1), lr=0.1)
            if step + 1 == fill_at:  # the disk fills up mid-run
                pad_to_a_page(run_dir / METRICS_LOG)
                pad_to_a_page(run_dir / RUN_LOG)
                fill(run_dir)
        session.write_result({"step": session.step})
        return session.step

    return train


@pytest.fixture
def config(tmp_path):
    return SessionConfig.from_mapping(
        {
            "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 10, "async_save": False},
            "divergence": {"enabled": False},
        }
    )


def test_a_full_disk_under_the_run_logs_costs_no_training(tmp_path, tmpfs, config, caplog):
    run_dir = tmpfs("1m")
    with caplog.at_level(logging.WARNING, logger="hydra_preempt"):
        outcome = run(training(run_dir, fill_at=FILL_AT), run_dir, config)
    # training went on to the end and its final checkpoint is saved; only result.json is missing
    assert (outcome.status, outcome.exit_code, outcome.step) == (Status.FAILED, ExitCode.FAILED, STEPS)
    assert "result.json (disk full)" in outcome.message and f"step {STEPS} is saved" in outcome.message
    assert "\n" not in outcome.message
    assert CheckpointStore(tmp_path / "ckpt").latest().step == STEPS
    # metrics.jsonl: the lines before the disk filled, then one warning
    assert [m["step"] for m in read_metrics(run_dir) if "step" in m] == list(range(1, FILL_AT + 1))
    metrics_warnings = [r for r in caplog.records if "metrics.jsonl (disk full)" in r.getMessage()]
    assert len(metrics_warnings) == 1 and metrics_warnings[0].levelno == logging.WARNING
    # run_log.jsonl: the stop event could not be appended, and says so in one line
    assert [e["event"] for e in read_events(run_dir) if e["event"] != "pad"] == ["start"]
    assert any(f"{RUN_LOG} (disk full)" in r.getMessage() and "'stop' event" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records) and read_result(run_dir) is None

    os.unlink(run_dir / "filler")  # space again: a restart resumes at the last step and writes the result
    again = run(training(run_dir), run_dir, config)
    assert again.status is Status.FINISHED and read_result(run_dir) == {"step": STEPS}
    assert [e.get("resumed_from") for e in read_events(run_dir) if e["event"] == "stop"] == [STEPS]
