"""The template of a user's own Hydra app (examples/hydra_app): runs, resumes, refuses bad values in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "examples" / "hydra_app" / "app.py"
pytestmark = pytest.mark.slow


def app(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(APP), f"hydra.run.dir={run_dir}", "trainer.epochs=2", *overrides]
    return subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=120)


def test_the_template_app_finishes_and_a_second_start_resumes(tmp_path):
    first = app(tmp_path / "run")
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "run" / "result.json").read_text())["step"] == 64  # 2 x 2048/64
    again = app(tmp_path / "run")
    assert again.returncode == 0 and "resumed from step-000000064" in again.stdout + again.stderr


@pytest.mark.parametrize(
    "override,said",
    [
        ("optim.lr=-1", "optim.lr must be a number > 0, got -1"),
        ("checkpoint.every_steps=abc", "checkpoint.every_steps must be null or int, got 'abc'"),
        ("+trainer.epohcs=3", "trainer.epohcs"),
        ("optim.lr=${nowhere}", "nowhere"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2_before_anything_runs(tmp_path, override, said):
    done = app(tmp_path / "run", override)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and said in output and "Traceback" not in output, output
    assert not (tmp_path / "run" / "checkpoints").exists()
