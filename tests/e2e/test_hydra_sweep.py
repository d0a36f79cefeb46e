"""`python train.py -m hydra/launcher=preempt_slurm ...` on the real cluster, preempted by the scheduler."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_preempt.rundir import read_events

from . import helpers
from .helpers import stops, wait_for

pytestmark = pytest.mark.slow

TRAIN = ["trainer.max_steps=200", "trainer.step_sleep=0.03", "trainer.log_every=50", "checkpoint.every_steps=100"]
GRID = ["optim.lr=0.01,0.003", "trainer.seed=1,2"]  # 4 jobs
LAUNCHER = [
    "hydra/launcher=preempt_slurm",
    f"hydra.launcher.account={helpers.ACCOUNT}",
    f"hydra.launcher.partition={helpers.PARTITION}",
    f"hydra.launcher.qos={helpers.QOS['REQUEUE']}",
    "hydra.launcher.cpus_per_task=2",  # a whole node per job: a 2-CPU high-priority job preempts it
    "hydra.launcher.timeout_min=20",
]


def sweep_command(sweep_dir, *extra):
    return [sys.executable, "train.py", "-m", *LAUNCHER, f"hydra.sweep.dir={sweep_dir}", *TRAIN, *GRID, *extra]


def manifest_jobs(sweep_dir):
    path = sweep_dir / "sweep_manifest.json"
    return json.loads(path.read_text())["jobs"] if path.exists() else None


@pytest.mark.parametrize("preempt_mode", ["REQUEUE"], indirect=True)
def test_sweep_with_two_preempted_jobs_finishes_identically_and_reruns_as_a_no_op(tmp_path, preempt_mode, request):
    sweep_dir = tmp_path / "sweep"
    launcher = subprocess.Popen(
        sweep_command(sweep_dir), cwd=helpers.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    jobs = wait_for(lambda: manifest_jobs(sweep_dir), "the sweep manifest", 120)
    assert len(jobs) == 4 and all(j["job_id"] for j in jobs)
    preempted, killed = jobs[:2], jobs[2]
    helpers.preempt_each_at_step([(job["job_id"], Path(job["dir"])) for job in preempted], 60)
    # The third job's training process is killed without a word (as the kernel's OOM killer does):
    # the launcher's waiting loop classifies the end (killed) and requeues the job.
    killed_dir = Path(killed["dir"])
    checkpoint = killed_dir / "checkpoints" / "step-000000100"
    wait_for(checkpoint.exists, "the third job's checkpoint of step 100", job_id=killed["job_id"])
    os.kill([e for e in read_events(killed_dir) if e["event"] == "start"][-1]["pid"], signal.SIGKILL)
    helpers.release_when_pending(killed["job_id"])
    out, _ = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, out
    assert f"job {killed['job_id']} ({killed_dir}) ended FAILED: killed" in out

    for job in jobs:
        run_dir = Path(job["dir"])
        overrides = [o for o in job["overrides"] if not o.startswith("hydra.")]
        result = json.loads((run_dir / "result.json").read_text())
        assert (
            result["params_sha256"]
            == helpers.reference_result(tmp_path / f"ref{job['num']}", overrides)["params_sha256"]
        ), job
        history = stops(run_dir)
        starts = [e for e in read_events(run_dir) if e["event"] == "start"]
        assert all(s["job_id"] == starts[0]["job_id"] for s in starts)  # one job, requeued in place
        assert (run_dir / ".hydra" / "config.yaml").exists()  # the job's whole history lives in its own directory
        if job is killed:
            [failure] = [e for e in read_events(run_dir) if e["event"] == "failure"]
            assert (failure["failure"], failure["by"]) == ("killed", "monitor")
            assert [s["reason"] for s in history] == ["finished"] and history[0]["resumed_from"] == 100
        elif job in preempted:
            assert [s["reason"] for s in history] == ["preempted", "finished"]
            assert history[1]["resumed_from"] == history[0]["step"] == history[0]["checkpoint_step"] >= 60
            assert [s["restart_count"] for s in starts] == [0, 1]
            assert helpers.final_sacct_states(job["job_id"]) == ["PREEMPTED", "COMPLETED"]
            helpers.record(f"{request.node.name} #{job['num']}", run_dir)
        else:
            assert [s["reason"] for s in history] == ["finished"]

    rerun = subprocess.run(sweep_command(sweep_dir), cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "0 job(s) to submit, 4 finished" in rerun.stdout + rerun.stderr
    assert manifest_jobs(sweep_dir) == jobs
    assert not helpers.queue()  # nothing was submitted


@pytest.mark.parametrize("preempt_mode", ["REQUEUE"], indirect=True)
def test_submit_and_return_then_status_and_resume(tmp_path, preempt_mode):
    """wait=false returns at once; while the job is with the scheduler (or once it has finished), the
    same command submits nothing again."""
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        "train.py",
        "-m",
        *LAUNCHER,
        f"hydra.sweep.dir={sweep_dir}",
        *TRAIN,
        "optim.lr=0.01",
        "hydra.launcher.wait=false",
    ]
    first = subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = manifest_jobs(sweep_dir)[0]["job_id"]
    again = subprocess.run(command, cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
    # the job is short (about 6 s of steps): under load it may finish before the second command looks
    said = again.stdout + again.stderr
    assert any(f"0 job(s) to submit, {n} finished, {1 - n} still with the scheduler" in said for n in (0, 1)), said
    assert manifest_jobs(sweep_dir)[0]["job_id"] == job_id

    def finished():
        rows = json.loads(
            subprocess.run(
                [sys.executable, "-m", "hydra_preempt.cli", "status", str(sweep_dir), "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        return rows if rows[0]["run"] == "finished" else None

    rows = wait_for(finished, "the job to finish", 300, job_id=job_id)
    assert rows[0]["job_id"] == job_id and rows[0]["checkpoint_step"] == 200 and rows[0]["result"]["step"] == 200
    deadline = time.monotonic() + 60
    while rows[0]["scheduler"] != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
        rows = finished()
    assert rows[0]["scheduler"] == "COMPLETED"


def test_invalid_qos_is_refused_with_the_schedulers_message(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(
        sweep_command(sweep_dir, "hydra.launcher.qos=nosuchqos"),
        cwd=helpers.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "qos='nosuchqos'" in out and "Invalid qos" in out and "Traceback" not in out
    assert not (sweep_dir / "sweep_manifest.json").exists()
