"""The CUDA paths on a real GPU: RNG per device, pinned staging, NVML, NCCL, FSDP2, device moves.

Every test here is marked `cuda` and skips, with its reason, where torch sees
no CUDA device (as on CI). tools/gpu_kit.py runs them on a GPU machine.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hydra_preempt import ExitCode, SessionConfig, run
from hydra_preempt.checkpoint.layout import read_manifest
from hydra_preempt.checkpoint.tree import HostStaging
from hydra_preempt.gpumetrics import GPU_METRICS_FILE
from tools.train_process import run_signalled

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
]
ROOT = Path(__file__).resolve().parents[2]


def worker(run_dir: Path, steps: int, *flags: str, stop_at: int | None = None) -> tuple[int, dict | None, str]:
    """Run tests/cuda/cuda_worker.py; with `stop_at`, SIGTERM it once it prints that step."""
    out = run_dir.with_suffix(".json")
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tests.cuda.cuda_worker", str(run_dir), str(steps), str(out), *flags]
    code, err = run_signalled(cmd, stop_at, ROOT)
    return code, json.loads(out.read_text()) if out.exists() else None, err[-3000:]


def stopped_twice(tmp_path: Path, steps: int, *flags: str) -> tuple[dict | None, dict | None]:
    """An uninterrupted run, and one stopped by SIGTERM at a third and two thirds of `steps`, resumed."""
    code, reference, out = worker(tmp_path / "reference", steps, *flags)
    assert code == 0, out
    run_dir = tmp_path / "stopped"
    for stop in (steps // 3, 2 * steps // 3):
        code, _, out = worker(run_dir, steps, *flags, stop_at=stop)
        assert code == ExitCode.REQUEUE, out
    code, resumed, out = worker(run_dir, steps, *flags)
    assert code == 0, out
    return reference, resumed


def test_a_gpu_run_stopped_twice_by_sigterm_ends_bit_identical(tmp_path):
    reference, resumed = stopped_twice(tmp_path, 300)
    assert reference and resumed and resumed["restarts"] == 2
    assert resumed["sha256"] == reference["sha256"]


def test_fsdp2_over_nccl_saves_and_resumes_through_the_sharded_path(tmp_path):
    reference, resumed = stopped_twice(tmp_path, 150, "--fsdp")
    assert reference and resumed and resumed["restarts"] == 2
    assert resumed["sha256"] == reference["sha256"]
    saved = sorted((tmp_path / "stopped" / "checkpoints").glob("step-*"))
    assert saved and all((s / "shards.json").is_file() for s in saved)


def test_background_staging_copies_gpu_tensors_into_reused_pinned_buffers():
    staging = HostStaging()
    tensors = [torch.randn(1000, 100, device="cuda"), torch.arange(10, device="cuda")]
    first = [staging.copy(i, t) for i, t in enumerate(tensors)]
    staging.copied(len(tensors))
    staging.wait()
    assert all(b.is_pinned() and b.device.type == "cpu" for b in first)
    assert all(torch.equal(b, t.cpu()) for b, t in zip(first, tensors))
    tensors[0].mul_(2)  # a second save reuses the same buffers and sees the new values
    second = [staging.copy(i, t) for i, t in enumerate(tensors)]
    staging.copied(len(tensors))
    staging.wait()
    assert [b.data_ptr() for b in second] == [b.data_ptr() for b in first]
    assert torch.equal(second[0], tensors[0].cpu())


def test_the_cuda_rng_state_of_every_device_is_saved_and_restored(tmp_path):
    draws: list[torch.Tensor] = []

    def train(session):
        session.register(model=torch.nn.Linear(2, 2).cuda())
        session.restore()
        for _ in session.steps(4):
            draws.append(torch.rand(3, device="cuda").cpu())
        return {}

    config = SessionConfig.from_mapping({"checkpoint": {"every_steps": 2, "async_save": False}})
    assert run(train, tmp_path / "a", config).exit_code == ExitCode.OK
    saved = sorted((tmp_path / "a" / "checkpoints").glob("step-*"))
    assert read_manifest(saved[0])["step"] == 2
    reference = list(draws)
    # a new run from step 2's checkpoint alone: its draws must be the reference's 3rd and 4th
    shutil.copytree(saved[0], tmp_path / "b" / "checkpoints" / saved[0].name)
    draws.clear()
    torch.cuda.manual_seed_all(12345)  # whatever the process's stream was, the checkpoint's wins
    assert run(train, tmp_path / "b", config).exit_code == ExitCode.OK
    assert [d.tolist() for d in draws] == [d.tolist() for d in reference[2:]]


def test_a_checkpoint_moves_from_cpu_to_cuda_and_back(tmp_path):
    seen: dict[str, list[float]] = {}

    def train_on(device: str, steps: int):
        def train(session):
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 2).to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
            session.register(model=model, optimizer=optimizer)
            session.restore()
            seen[f"{device}-restored-{steps}"] = model.weight.detach().cpu().flatten().tolist()
            for _ in session.steps(steps):
                model(torch.ones(3, 4, device=device)).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
            seen[f"{device}-end-{steps}"] = model.weight.detach().cpu().flatten().tolist()
            return {}

        return train

    config = SessionConfig.from_mapping({"checkpoint": {"async_save": False}})
    for device, steps in (("cpu", 3), ("cuda", 6), ("cpu", 9)):
        outcome = run(train_on(device, steps), tmp_path / "run", config)
        assert outcome.exit_code == ExitCode.OK, outcome.message
    assert seen["cuda-restored-6"] == seen["cpu-end-3"]
    assert seen["cpu-restored-9"] == seen["cuda-end-6"]


def test_nvml_readings_reach_the_metrics_file_the_manifest_and_validate(tmp_path):
    from hydra_preempt.validate.checks import PASS, check_gpu_metrics, check_nccl

    def train(session):
        model = torch.nn.Linear(512, 512).cuda()
        session.register(model=model)
        session.restore()
        for _ in session.steps(30):
            model(torch.randn(4096, 512, device="cuda")).sum().backward()
            torch.cuda.synchronize()
            import time

            time.sleep(0.05)
        return {}

    config = SessionConfig.from_mapping(
        {"gpu_metrics": {"every_s": 0.2}, "checkpoint": {"every_steps": 30, "async_save": False}}
    )
    assert run(train, tmp_path / "run", config).exit_code == ExitCode.OK
    records = [json.loads(line) for line in (tmp_path / "run" / GPU_METRICS_FILE).read_text().splitlines()]
    assert len(records) >= 2
    gpu = records[-1]["gpus"][0]
    assert "NVIDIA" in gpu["name"] and gpu["memory_total_mib"] > 1000 and gpu["memory_used_mib"] > 0
    (saved,) = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    gpus = read_manifest(saved)["gpus"]
    assert gpus and all("NVIDIA" in figures["name"] for figures in gpus.values()), gpus
    row = check_gpu_metrics()
    assert row.status == PASS, row
    row = check_nccl()
    assert row.status == PASS, row
