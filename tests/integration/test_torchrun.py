"""`hydra-preempt torchrun`: 2 ranks of a user's script (DDP over gloo, DataLoader workers) under
torchrun's agent, stopped by SIGTERM to the agent's process group (slurmstepd's signal with
proctrack/pgid: torchrun's workers lead sessions of their own, so only the agent gets it)."""

import json
import sys
from pathlib import Path

import pytest

from hydra_preempt import ExitCode
from hydra_preempt.doors.torchrun import agreed_exit_code
from hydra_preempt.rundir import read_events
from tools.train_process import run_signalled

ROOT = Path(__file__).resolve().parents[2]


def torchrun(run_dir: Path, *extra: str) -> list[str]:
    script = ["-m", "tests.integration.own_script", str(run_dir), "--workers", "2", "--epochs", "6"]
    return [sys.executable, "-m", "hydra_preempt.cli", "torchrun", *extra, "--nproc-per-node", "2", *script]


@pytest.mark.slow
def test_a_stop_passes_through_the_agent_to_the_ranks_and_its_exit_75_comes_out(tmp_path):
    code, err = run_signalled(torchrun(tmp_path / "reference"), cwd=ROOT, timeout=180)
    assert code == ExitCode.FINISHED, err
    code, err = run_signalled(torchrun(tmp_path / "run"), stop_at=13, cwd=ROOT, timeout=180)
    assert code == ExitCode.REQUEUE, err
    assert "hydra-preempt torchrun: the workers exited 75" in err and "Traceback" not in err, err
    code, err = run_signalled(torchrun(tmp_path / "run"), cwd=ROOT, timeout=180)
    assert code == ExitCode.FINISHED, err
    results = [json.loads((tmp_path / d / "result.json").read_text()) for d in ("reference", "run")]
    assert results[0] == results[1]
    stops = [e for e in read_events(tmp_path / "run") if e["event"] == "stop"]
    assert [s["reason"] for s in stops] == ["preempted", "finished"]
    assert stops[0]["step"] == stops[0]["checkpoint_step"] == stops[1]["resumed_from"]


def test_the_agent_refuses_restarts_of_its_own_in_one_line(tmp_path):
    code, err = run_signalled(torchrun(tmp_path, "--max-restarts", "2"), cwd=ROOT, timeout=60)
    assert code == ExitCode.USAGE
    assert err.strip() == "hydra-preempt torchrun: --max-restarts must be 0: a stopped run is continued by the requeue"


@pytest.mark.parametrize(
    "first, others, agreed",
    [
        (75, [75], 75),
        (75, [-15], 75),  # the agent tears the other workers down after the first exits
        (130, [], 130),
        (76, [-9], 76),
        (75, [1], 1),
        (1, [75], 1),
        (-9, [], 1),
    ],
)
def test_the_agent_exits_with_the_stop_code_its_workers_agree_on(first, others, agreed):
    assert agreed_exit_code(first, others) == agreed
