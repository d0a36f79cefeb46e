"""The GPU kit without a GPU: it says so and exits 0; its sections run on the CPU; its wheels install.

The kit itself runs on a GPU machine (README "The GPU kit"); here it is checked
as far as a machine without one allows: its no-GPU answer, every section but the
CUDA tests on the CPU (`--device cpu`), and the wheels it carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def kit(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tools.gpu_kit", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the kit runs for real")
def test_without_a_gpu_the_kit_says_so_and_exits_0(tmp_path):
    done = kit("--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["environment"]["ok"] and "no CUDA device" in (tmp_path / "gpu_report.txt").read_text()


def test_an_unknown_section_is_one_line_and_exit_2(tmp_path):
    done = kit("--out", str(tmp_path), "--only", "tests,warp")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "warp" in done.stderr, done.stderr


@pytest.mark.slow
def test_every_section_runs_on_the_cpu_and_reports_its_figures(tmp_path):
    sections = "determinism,sigterm,background"
    done = kit("--device", "cpu", "--gb", "0.02", "--steps", "30", "--out", str(tmp_path), "--only", sections)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert [name for name, entry in report.items() if entry["ok"]] == ["determinism", "sigterm", "background"]
    assert report["determinism"]["figures"]["repeatable"] and report["determinism"]["figures"]["resume_exact"]
    sigterm = report["sigterm"]["figures"]
    assert sigterm["exit_code"] == 75 and sigterm["bytes"] > 0.015e9 and sigterm["raw_write_s"] > 0
    assert report["background"]["figures"]["stall_over_copy"] is not None
    assert "stall, background / copy into reused buffers" in (tmp_path / "gpu_report.txt").read_text()


@pytest.mark.slow
def test_the_wheels_install_beside_a_torch_they_never_touch(tmp_path):
    dest, site = tmp_path / "whl", tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "tools.gpu_wheels", "--dest", str(dest)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    wheels = sorted(p.name for p in dest.iterdir())
    names = [w.split("-")[0] for w in wheels]
    assert sorted(names) == ["antlr4_python3_runtime", "hydra_core", "hydra_preempt", "omegaconf", "submitit"]
    assert all(w.endswith("-py3-none-any.whl") for w in wheels), wheels  # pure Python: any CPython 3
    with zipfile.ZipFile(next(dest.glob("hydra_preempt-*.whl"))) as z:
        files = z.namelist()
    assert "hydra_preempt/__init__.py" in files and "tools/gpu_kit.py" not in files
    assert any(f.startswith("hydra_plugins/hydra_preempt_launcher/") for f in files)
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
    subprocess.run([*install, *map(str, dest.iterdir())], check=True, capture_output=True)
    assert not (site / "torch").exists()
    probe = "import hydra_preempt, hydra, submitit; print(hydra_preempt.__file__)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stderr


def test_gpu_check_before_gpu_wheels_says_what_to_run_first(tmp_path):
    """A GPU machine's checkout without .whl/ (make gpu-wheels not run): one line, not pip's 'not a valid wheel'."""
    done = subprocess.run(
        ["make", "-s", "-f", str(ROOT / "Makefile"), "gpu-check"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert done.stderr.splitlines()[0] == (
        "make gpu-check: no wheels in .whl/: run make gpu-wheels first, where PyPI can be reached"
    ), done.stderr
