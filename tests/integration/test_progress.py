"""Progress lines from a real run through the session, in the log (not a terminal here)."""

import logging
import re
import time

import torch

from hydra_preempt import SessionConfig, run


def test_a_run_logs_progress_lines_with_its_checkpoints(tmp_path, caplog):
    def train(session):
        model = torch.nn.Linear(2, 1)
        session.register(model=model)
        for _ in session.steps(40):
            time.sleep(0.01)

    config = SessionConfig.from_mapping(
        {"checkpoint": {"every_steps": 10, "async_save": False}, "progress": {"every_s": 0.1}}
    )
    with caplog.at_level(logging.INFO, logger="hydra_preempt"):
        assert run(train, tmp_path, config).exit_code == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) >= 2, lines
    assert all("/40 (" in line and "steps/s ETA" in line for line in lines)
    assert re.search(r"\| checkpoint step [1-4]0, 0:0\d ago$", lines[-1]), lines[-1]
    assert not any(c in "".join(lines) for c in "\r\x1b")
