"""End-to-end on the test cluster: a hang is found by the watchdog and requeued inside the job; a
launch failure is classified by `hydra-preempt monitor` and requeued from outside."""

import subprocess
import sys

import pytest

from hydra_preempt.doors.hydra_sweep import SweepJob, save_manifest
from hydra_preempt.rundir import read_events
from hydra_preempt.slurm.commands import sacct_states, slurm_command

from . import helpers
from .helpers import ACCOUNT, ROOT, stops, wait_for

pytestmark = pytest.mark.slow

WORKER = f"{sys.executable} -m tests.integration.hang_worker"


def sbatch(script: str, log) -> str:
    args = ["sbatch", "--parsable", "-A", ACCOUNT, "-c", "2", "--requeue", "--open-mode=append"]
    return slurm_command([*args, "-o", str(log), "-D", str(ROOT), "--wrap", script]).strip()


def test_a_hung_step_is_requeued_by_the_watchdog_and_resumes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job_id = sbatch(f"srun {WORKER} {run_dir} 20 12", tmp_path / "job.log")
    wait_for(lambda: stops(run_dir), "the watchdog's hang stop", 120, job_id)
    hang = stops(run_dir)[-1]
    assert (hang["reason"], hang["step"], hang["checkpoint_step"], hang["restart"]) == ("hang", 12, 10, True)
    assert list(run_dir.glob("hang-stacks-*.txt"))
    helpers.release_when_pending(job_id)
    assert helpers.wait_until_final(job_id) == "COMPLETED"
    assert [s["reason"] for s in stops(run_dir)] == ["hang", "finished"]
    assert stops(run_dir)[-1]["resumed_from"] == 10
    assert [e for e in read_events(run_dir) if e["event"] == "requeue"]
    assert [state for state, _ in sacct_states(job_id)][-1] == "COMPLETED"


def test_the_monitor_requeues_a_launch_failure(slurm_cluster, tmp_path):
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    table = tmp_path / "failures.yaml"
    table.write_text(
        "classes:\n"
        "  - {name: finished, last_stops: [finished], slurm_states: [COMPLETED], restart: false}\n"
        "  - name: launch_failure\n"
        "    log_patterns: ['srun: error: Unable to create step for job']\n"
        "    restart: true\n    max_restarts: 1\n"
    )
    # The first run fails as a step launch does; the requeued run trains to the end.
    script = (
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then '
        'echo "srun: error: Unable to create step for job $SLURM_JOB_ID: Job/step already completing" >&2; exit 1; '
        f"fi; srun {WORKER} {run_dir} 20"
    )
    job_id = sbatch(script, tmp_path / "job.log")
    save_manifest(tmp_path / "sweep", {0: SweepJob(0, [], str(run_dir), "slurm", job_id)})
    monitor = subprocess.Popen(
        [sys.executable, "-m", "hydra_preempt.cli", "monitor", str(tmp_path / "sweep"), "--interval", "2",
         "--failures", str(table)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: [e for e in read_events(run_dir) if e["event"] == "requeue"], "the monitor's requeue", 180, job_id
        )
        helpers.release_when_pending(job_id)
        assert helpers.wait_until_final(job_id) == "COMPLETED"
        output, _ = monitor.communicate(timeout=120)  # settled: it ends by itself
    finally:
        if monitor.poll() is None:
            monitor.kill()
    assert monitor.returncode == 0, output
    assert "launch_failure (log: srun: error: Unable to create step for job" in output and "requeued" in output
    [failure] = [e for e in read_events(run_dir) if e["event"] == "failure"]
    assert (failure["failure"], failure["by"], failure["restart_reason"]) == (
        "launch_failure", "monitor", "launch_failure: restart (attempt 1/1)"
    )  # fmt: skip
    assert stops(run_dir)[-1]["reason"] == "finished"
