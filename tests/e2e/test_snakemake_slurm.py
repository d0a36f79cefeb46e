"""`snakemake --profile slurm` on the real cluster: training jobs preempted by the scheduler resume, the workflow completes.

The preemption SIGTERM travels srun -> the job's inner snakemake -> the rule's shell (exec) -> python;
these tests show it arrives (the state is saved at the step where it came) and that no layer ends the
job before SLURM requeues it.
"""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hydra_preempt.rundir import read_events
from hydra_preempt.slurm.commands import slurm_command

from . import helpers
from .helpers import stops, wait_for

pytestmark = pytest.mark.slow

COMMON = {"trainer.max_steps": 200, "trainer.step_sleep": 0.03, "trainer.log_every": 50, "checkpoint.every_steps": 100}
GRID = {"a": 0.01, "b": 0.003, "c": 0.001}


def write_grid(tmp_path: Path) -> Path:
    config = {
        "runs_dir": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "results"),
        "cpus_per_task": 2,  # a whole node per job: a 2-CPU high-priority job preempts it
        "runtime_min": 20,
        "common_overrides": COMMON,
        "experiments": [{"name": name, "overrides": {"optim.lr": lr}} for name, lr in GRID.items()],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(grid: Path, *extra: str, mode: str = "REQUEUE") -> list[str]:
    """The README's command, with this worker's partition and the QoS of PreemptMode `mode`."""
    resources = [f"slurm_account={helpers.ACCOUNT}", f"slurm_partition={helpers.PARTITION}"]
    resources += ["runtime=60", "mem_mb=2000", "cpus_per_task=1"]  # the rest of the profile's default-resources
    command = [sys.executable, "-m", "snakemake", "--profile", "slurm", "--configfile", str(grid)]
    return [*command, "--slurm-qos", helpers.QOS[mode], "--default-resources", *resources, *extra]


def start_snakemake(grid: Path, mode: str = "REQUEUE") -> subprocess.Popen[str]:
    """The workflow in the background, its output (both streams) for communicate()."""
    command = snakemake(grid, mode=mode)
    return subprocess.Popen(command, cwd=helpers.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def started_job_id(run_dir: Path) -> str:
    starts = wait_for(
        lambda: [e for e in read_events(run_dir) if e["event"] == "start"], f"training in {run_dir} to start", 300
    )
    return starts[0]["job_id"]


def reference_sha(tmp_path: Path, name: str) -> str:
    overrides = [f"{k}={v}" for k, v in COMMON.items()] + [f"optim.lr={GRID[name]}"]
    return helpers.reference_result(tmp_path / f"ref-{name}", overrides)["params_sha256"]


# PreemptMode=CANCEL (the job requeues itself from inside the workflow's job): the 2-node experiment
# of tests/e2e/test_multi_node.py.
@pytest.mark.parametrize("preempt_mode", ["REQUEUE"], indirect=True)
def test_preempted_experiment_resumes_and_the_workflow_completes(tmp_path, preempt_mode, request):
    grid = write_grid(tmp_path)
    workflow = start_snakemake(grid, mode=preempt_mode)
    run_a = tmp_path / "runs" / "a"
    job_id = started_job_id(run_a)
    helpers.preempt_at_step(job_id, run_a, 60)
    out, _ = workflow.communicate(timeout=900)
    assert workflow.returncode == 0, out
    (job_log,) = (helpers.ROOT / ".snakemake" / "slurm_logs").rglob(f"{job_id}.log")
    text = job_log.read_text()  # --open-mode=append: the requeued job's log keeps the preempted run's lines
    assert "preempted at step" in text and "finished at step" in text, text[-3000:]

    history = stops(run_a)
    assert [s["reason"] for s in history] == ["preempted", "finished"], history
    # the SIGTERM reached python: it saved at the step where it arrived, and the next start resumed there
    assert history[0]["checkpoint_step"] == history[0]["step"] >= 60
    assert history[1]["resumed_from"] == history[0]["step"]
    starts = [e for e in read_events(run_a) if e["event"] == "start"]
    assert [(s["job_id"], s["restart_count"]) for s in starts] == [
        (job_id, 0),
        (job_id, 1),
    ]  # requeued in place: no second copy
    expected = "PREEMPTED" if preempt_mode == "REQUEUE" else "REQUEUED"
    assert helpers.final_sacct_states(job_id) == [expected, "COMPLETED"]
    for name in GRID:
        result = json.loads((tmp_path / "runs" / name / "result.json").read_text())
        assert result["params_sha256"] == reference_sha(tmp_path, name), name
    helpers.record(request.node.name, run_a)

    results = tmp_path / "results"
    with open(results / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["experiment"] for r in rows] == list(GRID)
    assert rows[0]["preemptions"] == rows[0]["restarts"] == "1"  # a: preempted once
    assert rows[0]["params_sha256"] == reference_sha(tmp_path, "a") and float(rows[0]["loss"]) > 0
    assert (results / "summary.md").read_text().startswith("| experiment |")
    assert (results / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run(
        snakemake(grid, mode=preempt_mode), cwd=helpers.ROOT, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr
    assert not helpers.queue()


@pytest.mark.parametrize("preempt_mode", ["REQUEUE"], indirect=True)
def test_killed_snakemake_started_again_finishes_without_retraining(tmp_path, preempt_mode):
    """SIGKILL to the main snakemake (its terminal closed): its jobs keep running; the same command
    again (after --unlock) plans only what is unfinished; a duplicate job of a still-running experiment
    waits for it and resumes from its end instead of training beside it."""
    grid = write_grid(tmp_path)
    workflow = start_snakemake(grid)
    wait_for(lambda: (tmp_path / "runs" / "a" / "result.json").exists(), "experiment a to finish", 300)
    started_job_id(tmp_path / "runs" / "b")
    workflow.send_signal(signal.SIGKILL)
    workflow.communicate()
    finished_a = (tmp_path / "runs" / "a" / "result.json").read_text()

    subprocess.run(snakemake(grid, "--unlock"), cwd=helpers.ROOT, check=True, capture_output=True, timeout=120)
    again = subprocess.run(snakemake(grid), cwd=helpers.ROOT, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert (tmp_path / "runs" / "a" / "result.json").read_text() == finished_a  # not retrained
    assert len([e for e in read_events(tmp_path / "runs" / "a") if e["event"] == "start"]) == 1
    for name in ("b", "c"):
        run_dir = tmp_path / "runs" / name
        history = stops(run_dir)
        assert history[-1]["reason"] == "finished"
        trained = [s for s in history if s["resumed_from"] != s["step"]]
        assert len(trained) == 1, history  # every step trained once, whichever job did it
        assert json.loads((run_dir / "result.json").read_text())["params_sha256"] == reference_sha(tmp_path, name)
    assert (tmp_path / "results" / "summary.csv").exists()
    deadline = time.monotonic() + 60
    while helpers.queue() and time.monotonic() < deadline:
        time.sleep(1)


@pytest.mark.parametrize("preempt_mode", ["REQUEUE"], indirect=True)
def test_time_limit_inside_snakemake_checkpoints_requeues_and_finishes(tmp_path, preempt_mode, request):
    """The time-limit warning is --signal=TERM@signal_lead_s (measured: a USR2 to the job step kills the
    job's inner snakemake, and with it python, before anything is saved: the job ends FAILED)."""
    common = {**COMMON, "trainer.max_steps": 2500, "checkpoint.every_steps": 1000}
    config = {
        "runs_dir": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "results"),
        "cpus_per_task": 2,
        "runtime_min": 2,
        "signal_lead_s": 30,
        "common_overrides": common,
        "experiments": [{"name": "long", "overrides": {"optim.lr": 0.01}}],
    }
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "snakemake.log"  # a file, not a pipe: nobody reads it while the test polls
    workflow = subprocess.Popen(snakemake(grid), cwd=helpers.ROOT, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    run_dir = tmp_path / "runs" / "long"
    job_id = started_job_id(run_dir)
    # SLURM sends the signal 30 to 90 s before the limit: the run needs two or three starts
    deadline = time.monotonic() + 900
    while workflow.poll() is None and time.monotonic() < deadline:
        if helpers.job_state(job_id) == "PENDING":  # requeued: skip the ~120 s BeginTime
            slurm_command(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        time.sleep(2)
    assert workflow.wait(timeout=60) == 0, log_path.read_text()

    history = stops(run_dir)
    reasons = [s["reason"] for s in history]
    assert reasons[-1] == "finished" and set(reasons[:-1]) == {"timeout"}, history
    for before, after in zip(history, history[1:]):
        assert after["resumed_from"] == before["step"] == before["checkpoint_step"] > 0  # 0 steps lost
    states = helpers.final_sacct_states(job_id)
    assert states == ["REQUEUED"] * (len(history) - 1) + ["COMPLETED"], states
    starts = [e for e in read_events(run_dir) if e["event"] == "start"]
    assert [s["restart_count"] for s in starts] == list(range(len(history)))
    reference = helpers.reference_result(
        tmp_path, [f"{k}={v}" for k, v in common.items() if k != "trainer.step_sleep"] + ["optim.lr=0.01"]
    )
    assert json.loads((run_dir / "result.json").read_text())["params_sha256"] == reference["params_sha256"]
    helpers.record(request.node.name, run_dir)
