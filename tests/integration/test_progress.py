"""A real run through the session: its progress lines in the log (not a terminal here), its GPU sampling."""

import logging
import re
import time

import torch

from hydra_preempt import SessionConfig, run
from hydra_preempt.gpumetrics import GPU_METRICS_FILE, NvmlUnavailable, load_nvml


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


def test_a_run_samples_its_gpus_only_where_nvml_answers(tmp_path, caplog):
    try:
        load_nvml().nvmlShutdown()
        nvml = True
    except NvmlUnavailable:
        nvml = False

    def train(session):
        session.register(model=torch.nn.Linear(2, 1))
        for _ in session.steps(5):
            time.sleep(0.01)

    config = SessionConfig.from_mapping({"gpu_metrics": {"every_s": 0.01}})
    with caplog.at_level(logging.INFO, logger="hydra_preempt"):
        assert run(train, tmp_path, config).exit_code == 0
    off = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GPU metrics are off")]
    assert (tmp_path / GPU_METRICS_FILE).exists() is nvml
    assert len(off) == (0 if nvml else 1), off
