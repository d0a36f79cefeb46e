"""End-to-end on the test cluster: a hang is found by the watchdog and requeued inside the job; every
other kind of failure is classified and restarted (or not) per the shipped policy, inside the job or by
`hydra-preempt monitor` from outside, and a restarted run ends with the uninterrupted run's state."""

import contextlib
import re
import subprocess
import sys
import time

import pytest

from hydra_preempt import SessionConfig, run
from hydra_preempt.doors.hydra_sweep import SweepJob, save_manifest
from hydra_preempt.rundir import read_events, read_result
from hydra_preempt.slurm.commands import SlurmError, slurm_command

from . import helpers
from .fault_worker import train as fault_train
from .helpers import ACCOUNT, ROOT, job_state, last_step, stops, wait_for

pytestmark = pytest.mark.slow

WORKER = f"{sys.executable} -m tests.integration.hang_worker"


def sbatch(script: str, log, cpus: int = 2) -> str:
    args = ["sbatch", "--parsable", "-A", ACCOUNT, "-p", helpers.PARTITION, "-c", str(cpus), "--requeue"]
    args += ["--open-mode=append"]
    return slurm_command([*args, "-o", str(log), "-D", str(ROOT), "--wrap", script]).strip()


def test_a_hung_step_is_requeued_by_the_watchdog_and_finishes_identical(slurm_cluster, tmp_path):
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
    assert helpers.final_sacct_states(job_id)[-1] == "COMPLETED"
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "tests.integration.hang_worker", str(reference), "20"], cwd=ROOT, check=True)
    assert read_result(run_dir) == read_result(reference)  # the same parameters as an uninterrupted run


def test_each_kind_of_failure_is_classified_and_restarted_per_policy(slurm_cluster, tmp_path):
    """One sweep, one monitor, seven runs that fail in seven ways (the shipped table, backoffs set to 0)."""
    table = tmp_path / "failures.yaml"
    shipped = (ROOT / "hydra_preempt" / "slurm" / "failures.yaml").read_text()
    table.write_text(re.sub(r"backoff_s: \d+", "backoff_s: 0", shipped))
    fault = f"{sys.executable} -m tests.e2e.fault_worker"
    launch_failure = (  # the first start fails as a step launch does; the requeued one trains
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then '
        'echo "srun: error: Unable to create step for job $SLURM_JOB_ID: Job/step already completing" >&2; exit 1; '
        "fi; "
    )
    sweep = tmp_path / "sweep"
    scripts = {
        "killed": "srun {fault} {run} kill 12",  # dies without a word: the monitor restarts it
        "nccl_log": "srun {fault} {run} nccl-log 12",  # NCCL's watchdog aborts: the monitor reads the log
        "nccl": "srun {fault} {run} nccl 12",  # raised in the process: it requeues itself
        "cuda_oom": "srun {fault} {run} cuda-oom 12",  # not restarted
        "budget": "srun {fault} {run} nccl 12 --every-start",  # four failures, max_restarts 3
        "launch_failure": launch_failure + "srun {fault} {run} none 0",
        "cancelled": "srun {fault} {run} slow 11",  # scancel: not restarted
    }
    jobs = {}
    for num, (name, script) in enumerate(scripts.items()):
        run_dir = sweep / name
        run_dir.mkdir(parents=True)
        command = script.replace("{fault}", fault).replace("{run}", str(run_dir)) + f" --failures {table}"
        jobs[name] = SweepJob(num, [], str(run_dir), "slurm", sbatch(command, run_dir / "job.log", cpus=1))
    save_manifest(sweep, dict(enumerate(jobs.values())))
    config = SessionConfig.from_mapping({"checkpoint": {"every_steps": 5, "async_save": False}})
    reference = run(lambda session: fault_train(session, "none", 0, False), tmp_path / "reference", config).result

    monitor = subprocess.Popen(
        [sys.executable, "-m", "hydra_preempt.cli", "monitor", str(sweep), "--interval", "1", "--failures", str(table)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    cancelled = False
    try:
        deadline = time.monotonic() + 420
        while monitor.poll() is None:  # it ends by itself once every job finished or was stopped
            assert time.monotonic() < deadline, "the monitor did not settle"
            for job in jobs.values():  # a requeued job waits ~120 s (BeginTime): make it eligible at once
                if job_state(job.job_id) == "PENDING":
                    with contextlib.suppress(SlurmError):  # it may have started since
                        slurm_command(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"])
            if not cancelled and last_step(sweep / "cancelled") >= 12:
                slurm_command(["scancel", jobs["cancelled"].job_id])
                cancelled = True
            time.sleep(1)
        output = monitor.stdout.read()
    finally:
        if monitor.poll() is None:
            monitor.kill()
    assert monitor.returncode == 0, output

    def events(name, kind):
        return [e for e in read_events(sweep / name) if e["event"] == kind]

    def finished_identical(name):
        assert helpers.wait_until_final(jobs[name].job_id) == "COMPLETED", name
        assert stops(sweep / name)[-1]["reason"] == "finished", name
        assert read_result(sweep / name) == reference, name

    # Died without a word, or with NCCL's last words in the log: classified and requeued by the monitor.
    for name, failure, evidence in (
        ("killed", "killed", "run log: this start wrote no stop"),
        ("nccl_log", "nccl", "log: [rank0]:[E1128 04:41:07.123456 2512 ProcessGroupNCCL.cpp:616] [Rank 0] Watchdog"),
        ("launch_failure", "launch_failure", "log: srun: error: Unable to create step for job"),
    ):
        [judged] = events(name, "failure")
        assert (judged["failure"], judged["by"]) == (failure, "monitor"), judged
        assert judged["evidence"].startswith(evidence) and judged["restart_reason"].startswith(f"{failure}: restart")
        assert [e["by"] for e in events(name, "requeue")] == ["monitor"]
        finished_identical(name)
    assert stops(sweep / "killed")[-1]["resumed_from"] == 10

    # Raised in the process: the run requeues itself, as after a preemption.
    first, last = stops(sweep / "nccl")
    assert (first["failure"], first["restart"], first["restart_reason"]) == (
        "nccl",
        True,
        "nccl: restart (attempt 1/3)",
    )
    assert last["resumed_from"] == 12 and not events("nccl", "failure")  # the emergency checkpoint
    assert [e.get("by", "the job") for e in events("nccl", "requeue")] == ["the job"]
    finished_identical("nccl")

    # Not restarted: the stop names the class.
    [oom] = stops(sweep / "cuda_oom")
    assert (oom["failure"], oom["restart"], oom["restart_reason"]) == ("cuda_oom", False, "cuda_oom: not restarted")
    assert helpers.wait_until_final(jobs["cuda_oom"].job_id) == "FAILED"
    assert "decided by the job: cuda_oom: not restarted" in output

    # Four failures with max_restarts 3: restarts 1 to 3, then the budget message.
    reasons = [s["restart_reason"] for s in stops(sweep / "budget")]
    assert reasons == [f"nccl: restart (attempt {i}/3)" for i in (1, 2, 3)] + [
        "nccl: retry budget exhausted (attempt 4/3)"
    ]
    assert helpers.wait_until_final(jobs["budget"].job_id) == "FAILED"

    # scancel: the state is saved, nothing is restarted.
    [stop] = stops(sweep / "cancelled")
    assert stop["reason"] == "cancelled" and stop["checkpoint_step"] == stop["step"] >= 12
    assert helpers.wait_until_final(jobs["cancelled"].job_id).startswith("CANCELLED")
    assert not events("cancelled", "requeue")
    assert f"job {jobs['cancelled'].job_id} ({sweep / 'cancelled'}) ended CANCELLED" in output
    assert output.count("requeued") == 3, output
