"""The Snakemake workflow without a cluster (`--profile local`), and bad grids refused at parse time."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hydra_preempt.rundir import read_events

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMMON = {"trainer.max_steps": 60, "checkpoint.every_steps": 20}


def write_grid(tmp_path: Path, experiments, **extra) -> Path:
    config = {
        "runs_dir": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "results"),
        "common_overrides": COMMON,
        "experiments": experiments,
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(grid: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "local",
        "--configfile",
        str(grid),
        *extra,
    ]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_local_run_completes_and_a_second_run_has_nothing_to_do(tmp_path):
    grid = write_grid(
        tmp_path, [{"name": "a", "overrides": {"optim.lr": 0.01}}, {"name": "b", "overrides": {"optim.lr": 0.001}}]
    )
    done = snakemake(grid)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = (tmp_path / "results" / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["experiment", "a", "b"]
    assert all(r.split(",")[1] == "60" for r in rows[1:])
    assert (tmp_path / "results" / "loss_curves.png").stat().st_size > 1000
    again = snakemake(grid)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_a_failed_experiment_does_not_stop_the_others_and_keeps_its_checkpoint(tmp_path):
    """b diverges on purpose (learning rate 1.0, a touchy detector): it fails at step ~35 with checkpoints
    at 10, 20, 30 on disk; they stay (maybe set aside as diverged-step-*, never deleted); a and c finish
    (keep-going)."""
    experiments = [
        {"name": "a", "overrides": {"optim.lr": 0.01}},
        {
            "name": "b",
            "overrides": {
                "optim.lr": 1.0,
                "checkpoint.every_steps": 10,
                "divergence.patience": 1,
                "divergence.min_history": 20,
                "divergence.factor": 1.5,
            },
        },
        {"name": "c", "overrides": {"optim.lr": 0.001}},
    ]
    grid = write_grid(tmp_path, experiments)
    done = snakemake(grid)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "rule train" in out and "b" in out
    for name in ("a", "c"):
        assert (tmp_path / "runs" / name / "result.json").exists(), out
    run_b = tmp_path / "runs" / "b"
    assert not (run_b / "result.json").exists()
    stop = [e for e in read_events(run_b) if e["event"] == "stop"][-1]
    assert stop["reason"] == "diverged" and stop["exit_code"] == 3, stop
    # kept: as they were, or moved aside as diverged-step-* when the detector judged them suspect
    kept = [p.name for p in (run_b / "checkpoints").iterdir() if "step-" in p.name]
    assert kept, "the failed experiment's checkpoints were removed"
    assert not (tmp_path / "results" / "summary.csv").exists()


# Two cases, one per layer of the check (snakemake's validate() against the schema; load_experiments):
# every message of load_experiments is unit-tested in tests/unit/test_grid_and_sweep.py.
@pytest.mark.parametrize(
    "experiments, extra, message",
    [
        ([{"name": "a"}], {"learning_rate": 1}, "learning_rate"),
        (
            [{"name": "a", "overrides": {"optim.lr": 0.1}}, {"name": "a", "overrides": {"optim.lr": 0.2}}],
            {},
            "duplicate experiment name 'a'",
        ),
    ],
)
def test_an_invalid_grid_fails_at_parse_time_naming_the_entry(tmp_path, experiments, extra, message):
    grid = write_grid(tmp_path, experiments, **extra)
    done = snakemake(grid, "-n")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert message in out, out
    assert not (tmp_path / "runs").exists()


def test_the_rules_work_as_a_module_of_another_workflow(tmp_path):
    """The README's Snakefile, as written: a user's own workflow pulls the rules in with `module`,
    prefixes them and names its own default target."""
    from tests.integration.test_readme_examples import SNAKEFILES

    grid = {
        "runs_dir": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "results"),
        "train_script": str(ROOT / "train.py"),
        "common_overrides": COMMON,
        "experiments": [{"name": "only", "overrides": {"optim.lr": 0.01}}],
    }
    (tmp_path / "Snakefile").write_text(SNAKEFILES[0])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"preempt": grid}))
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "report.txt").read_text().strip() == "2"  # header + one experiment
    assert json.loads((tmp_path / "runs" / "only" / "result.json").read_text())["step"] == 60
