"""The pure parts of `hydra-preempt validate`: grace lookup, fit verdict, exit code, table; NVML readings."""

import json
import logging
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra_preempt.gpumetrics import (
    GPU_METRICS_FILE,
    GpuSampler,
    GpuSummary,
    NvmlUnavailable,
    read_gpus,
    summarize,
    visible_indices,
)
from hydra_preempt.validate.checks import FAIL, PASS, SKIP, Row, exit_code, format_rows, grace_fit, pick_grace
from hydra_preempt.validate.slurm import settings_rows

QOS = "normal|\npreemptible|00:00:30\nscavenger|120\n"


def test_pick_grace_takes_the_named_qos_or_the_shortest_non_zero():
    assert pick_grace(QOS, "scavenger") == ("scavenger", 120.0)
    assert pick_grace(QOS, None) == ("preemptible", 30.0)
    assert pick_grace(QOS, "missing") is None
    assert pick_grace("normal|\n", None) is None


def test_grace_fit_says_whether_the_predicted_save_fits():
    too_slow = grace_fit(40.0, 40 / 52, ("preemptible", 30.0), "")
    assert too_slow.status == FAIL
    assert too_slow.reason.startswith(
        "a 40 GB state takes about 52 s to save here; GraceTime of QoS preemptible is 30 s"
    )
    assert "will not fit" in too_slow.reason and too_slow.figures["predicted_save_s"] == 52.0
    assert grace_fit(1.0, 1.0, ("preemptible", 30.0), "").status == PASS
    unknown = grace_fit(1.0, 0.5, None, "SLURM is not installed here")
    assert unknown.status == SKIP and "about 2 s" in unknown.reason and "SLURM is not installed here" in unknown.reason
    assert grace_fit(None, 1.0, ("preemptible", 30.0), "").status == SKIP


def test_exit_code_is_zero_only_without_a_fail_and_the_table_has_one_line_per_row():
    rows = [Row("a", PASS, "fine"), Row("longer name", SKIP, "no GPU")]
    assert exit_code(rows) == 0
    assert exit_code([*rows, Row("b", FAIL, "broken")]) == 1
    assert format_rows(rows).splitlines() == ["PASS  a            fine", "SKIP  longer name  no GPU"]


class FakeNvml:
    """pynvml's calls the project makes, answering for two GPUs."""

    NVML_TEMPERATURE_GPU = 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=50 + handle)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 60

    def nvmlDeviceGetPowerUsage(self, handle):
        return 300_500  # milliwatts


def test_read_gpus_reads_every_visible_gpu_in_plain_units():
    gpus = read_gpus(FakeNvml(), [1])
    assert gpus == [
        {
            "index": 1,
            "name": "NVIDIA H100",
            "memory_used_mib": 2048.0,
            "memory_total_mib": 81920.0,
            "utilization_pct": 51.0,
            "temperature_c": 60.0,
            "power_w": 300.5,
        }
    ]


def test_visible_indices_follow_cuda_visible_devices_when_it_lists_numbers():
    assert visible_indices(4, {}) == [0, 1, 2, 3]
    assert visible_indices(4, {"CUDA_VISIBLE_DEVICES": "2,3,7"}) == [2, 3]
    assert visible_indices(2, {"CUDA_VISIBLE_DEVICES": "GPU-1234"}) == [0, 1]
    assert visible_indices(2, {"CUDA_VISIBLE_DEVICES": ""}) == []


# What the test cluster (tests/cluster/slurm-cluster.sh) answered, verbatim
CONFIG = "JobRequeue              = 1\nKillWait                = 10 sec\nPreemptMode             = CANCEL\n"
QOS_MODES = "normal|00:00:00|cluster\npreemptible|00:00:30|cluster\n"
ASSOC = "research|normal,preemptible\nroot|normal\n"


def test_settings_rows_read_the_schedulers_answers():
    rows = {r.name: r for r in settings_rows(CONFIG, QOS_MODES, ASSOC, None, None)}
    assert [r.status for r in rows.values()] == [PASS] * 5
    assert rows["slurm: QoS"].reason == "QoS preemptible may be used from account research"
    assert rows["slurm: GraceTime"].figures == {"grace_s": 30.0}
    assert rows["slurm: PreemptMode"].figures == {"mode": "CANCEL"}
    assert rows["slurm: KillWait"].figures == {"kill_wait_s": 10.0}
    assert rows["slurm: JobRequeue"].figures == {"job_requeue": 1}


def test_settings_rows_fail_a_qos_the_account_may_not_use_or_without_grace():
    rows = {r.name: r for r in settings_rows(CONFIG, QOS_MODES, ASSOC, "preemptible", "root")}
    assert rows["slurm: QoS"].status == FAIL and "account root may not use it" in rows["slurm: QoS"].reason
    rows = {r.name: r for r in settings_rows(CONFIG, QOS_MODES, ASSOC, "normal", None)}
    assert rows["slurm: GraceTime"].status == FAIL
    assert [r.status for r in settings_rows(CONFIG, QOS_MODES, ASSOC, "missing", None)] == [FAIL]
    off = settings_rows(CONFIG.replace("CANCEL", "OFF"), QOS_MODES, ASSOC, None, None)
    assert {r.name: r.status for r in off}["slurm: PreemptMode"] == FAIL


def test_validate_slurm_without_slurm_says_so_in_one_line_and_exits_2(tmp_path):
    # An empty PATH: no scontrol at all, whatever this machine has installed
    done = subprocess.run(
        [sys.executable, "-m", "hydra_preempt.cli", "validate", "--slurm"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path)},
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "hydra-preempt: --slurm: SLURM does not answer here (scontrol not found: SLURM's commands are not installed here)"
    ]


@pytest.mark.parametrize("gpu", [True, False])
def test_the_sampler_without_nvml_logs_one_line_where_a_gpu_is_and_writes_nothing(tmp_path, caplog, gpu):
    """A machine with a GPU is told why it is not measured; one without a GPU has nothing to measure."""

    def no_driver():
        raise NvmlUnavailable("NVML does not answer: Driver Not Loaded")

    sampler = GpuSampler(tmp_path / GPU_METRICS_FILE, 0.01, no_driver, gpu_present=lambda: gpu)
    with caplog.at_level(logging.INFO, logger="hydra_preempt"):
        assert sampler.start() is False
        sampler.stop()
    said = ["GPU metrics are off: NVML does not answer: Driver Not Loaded"] if gpu else []
    assert [r.getMessage() for r in caplog.records] == said
    assert list(tmp_path.iterdir()) == []


def test_the_sampler_writes_readings_until_stopped_and_summarizes_them(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml()
    shutdowns = []
    nvml.nvmlShutdown = lambda: shutdowns.append(True)
    path = tmp_path / GPU_METRICS_FILE
    sampler = GpuSampler(path, 0.01, lambda: nvml)
    assert sampler.start() is True
    deadline = time.monotonic() + 10
    while (not path.exists() or len(path.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(samples) >= 3 and shutdowns == [True]
    assert [g["index"] for g in samples[0]["gpus"]] == [0, 1] and samples[0]["time"] > 0
    assert sampler.summary() == summarize(path)  # the running summary is the file's
    with path.open("a") as f:
        f.write(
            '{"time": 1, "gpus": [{"index": 0, "name": "NVIDIA H100", "memory_used_mib": 9000.0, '
            '"memory_total_mib": 81920.0, "utilization_pct": 10.0, "temperature_c": 71.0, "power_w": 100.5}]}\n{"cut'
        )
    summary = summarize(path)
    n = len(samples) + 1
    assert summary["0"] == {
        "name": "NVIDIA H100",
        "samples": n,
        "peak_memory_mib": 9000.0,
        "memory_total_mib": 81920.0,
        "mean_utilization_pct": round((50 * len(samples) + 10) / n, 1),
        "peak_temperature_c": 71.0,
        "mean_power_w": round((300.5 * len(samples) + 100.5) / n, 1),
    }
    assert summary["1"]["peak_memory_mib"] == 2048.0 and summary["1"]["samples"] == len(samples)
    assert summarize(tmp_path / "missing.jsonl") is None


def test_the_summary_keeps_only_finite_figures_and_is_none_without_readings():
    summary = GpuSummary()
    assert summary.as_dict() is None
    summary.add([{"index": 3, "memory_used_mib": float("inf"), "utilization_pct": 20.0}])
    assert summary.as_dict() == {
        "3": {"name": "", "samples": 1, "memory_total_mib": 0.0, "mean_utilization_pct": 20.0, "mean_power_w": 0.0}
    }


# Lines as SLURM's tools could print them, and worse: fields, separators, odd bytes decoded with replacement.
_FIELD = st.sampled_from(["preemptible", "normal", "research", "00:02:00", "1-00:00:00", "UNLIMITED", "REQUEUE",
                          "CANCEL,GANG", "", "abc", "120", "-5", "nan", "1e400", "\ufffd", "a|b", "||", "=", " "])  # fmt: skip
_LINES = st.lists(st.lists(_FIELD, max_size=4).map("|".join), max_size=6).map("\n".join)


@settings(max_examples=300, deadline=None)
@given(
    config=st.lists(
        st.sampled_from(["KillWait = 30 sec", "JobRequeue = 1", "PreemptMode = OFF", "KillWait=x", "="])
    ).map("\n".join),
    qos_text=_LINES,
    assoc_text=_LINES,
    qos=st.sampled_from([None, "preemptible", "", "a|b"]),
    account=st.sampled_from([None, "research", ""]),
)
def test_the_scheduler_settings_rows_never_raise_on_any_answer(config, qos_text, assoc_text, qos, account):
    """validate --slurm reads scontrol's and sacctmgr's answers: whatever they print, rows, never a traceback."""
    rows = settings_rows(config, qos_text, assoc_text, qos, account)
    assert rows and all(row.status in (PASS, FAIL, SKIP) for row in rows)
