"""A real run through the session: its progress lines in the log (not a terminal here), its GPU sampling."""

import json
import logging
import re
import sys
import time

import torch

from hydra_preempt import SessionConfig, run
from hydra_preempt.checkpoint.layout import MANIFEST_FILE
from hydra_preempt.checkpoint.store import CheckpointStore
from hydra_preempt.gpumetrics import GPU_METRICS_FILE, NvmlUnavailable, has_nvidia_device, load_nvml
from tests.unit.test_validate_logic import FakeNvml


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
    assert len(off) == (1 if not nvml and has_nvidia_device() else 0), off  # no GPU here: nothing to say


def test_every_checkpoint_manifest_summarizes_the_gpus_sampled_so_far(tmp_path, monkeypatch):
    """NVML's answers (a stand-in pynvml module for two GPUs) reach the manifest of every checkpoint,
    those written in the background included, and are read back verified."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    metrics = tmp_path / GPU_METRICS_FILE

    def train(session):
        session.register(model=torch.nn.Linear(2, 1))
        deadline = time.monotonic() + 30
        while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) and time.monotonic() < deadline:
            time.sleep(0.005)  # two samples taken: the summary holds at least the first
        for _ in session.steps(12):
            pass

    config = SessionConfig.from_mapping({"gpu_metrics": {"every_s": 0.01}, "checkpoint": {"every_steps": 5}})
    result = run(train, tmp_path, config)
    assert result.exit_code == 0
    infos = CheckpointStore(tmp_path / "checkpoints").complete()
    steps = [(i.step, i.reason) for i in infos]  # step 10's is skipped while step 5's is still written
    assert steps[0] == (5, "periodic") and steps[-1] == (12, "final"), steps
    for info in infos:
        manifest = json.loads((info.path / MANIFEST_FILE).read_text())
        assert info.gpus == manifest["gpus"] and sorted(info.gpus) == ["0", "1"]
        for index, gpu in info.gpus.items():
            assert gpu["name"] == "NVIDIA H100" and gpu["samples"] >= 1
            assert gpu["peak_memory_mib"] == 1024.0 * (int(index) + 1) and gpu["memory_total_mib"] == 81920.0
            assert gpu["mean_utilization_pct"] == 50.0 + int(index) and gpu["mean_power_w"] == 300.5
    assert infos[-1].gpus["0"]["samples"] >= infos[0].gpus["0"]["samples"]
