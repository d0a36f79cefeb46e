"""End-to-end on a real SLURM cluster: the preemption comes from the scheduler, not from a test.

A training job in the preemptible QoS is preempted by a higher-priority job
that needs the CPUs; requeued jobs are made eligible at once (instead of
SLURM's ~120 s BeginTime), nothing else is shortened.
"""

import json

import pytest

from hydra_preempt import preemptible_executor
from hydra_preempt.rundir import read_events
from hydra_preempt.slurm.commands import SlurmError
from tests.integration.test_multi_rank import TRAIN as DDP_TRAIN

from . import helpers
from .helpers import last_step, stops, wait_for

pytestmark = pytest.mark.slow

TRAIN = ["trainer.max_steps=500", "trainer.step_sleep=0.03", "trainer.log_every=50", "checkpoint.every_steps=100"]


@pytest.mark.parametrize("preempt_mode", ["REQUEUE", "CANCEL"], indirect=True)
def test_preempted_twice_resumes_exactly(tmp_path, preempt_mode, request):
    reference = helpers.reference_result(tmp_path, TRAIN)
    job, run_dir = helpers.submit_training(tmp_path, TRAIN, preempt_mode)
    for at_step in (120, 300):
        helpers.preempt_at_step(job.job_id, run_dir, at_step)
    assert helpers.wait_until_final(job.job_id) == "COMPLETED"

    result = job.result()
    assert result["params_sha256"] == reference["params_sha256"]
    assert result["restarts"] == 2
    history = stops(run_dir)
    assert [s["reason"] for s in history] == ["preempted", "preempted", "finished"]
    for before, after in zip(history, history[1:]):
        assert after["resumed_from"] == before["step"] == before["checkpoint_step"]  # 0 steps lost
    starts = [e for e in read_events(run_dir) if e["event"] == "start"]
    assert [s["restart_count"] for s in starts] == [0, 1, 2]
    assert len({s["job_id"] for s in starts}) == 1  # requeued: same job id
    states = helpers.final_sacct_states(job.job_id)
    # REQUEUE: SLURM requeued the job it killed at grace end. CANCEL: the job requeued itself.
    expected = "PREEMPTED" if preempt_mode == "REQUEUE" else "REQUEUED"
    assert states == [expected, expected, "COMPLETED"], states
    helpers.record(request.node.name, run_dir)


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_scancel_saves_and_does_not_requeue(tmp_path, preempt_mode):
    job, run_dir = helpers.submit_training(tmp_path, TRAIN, preempt_mode)
    wait_for(lambda: last_step(run_dir) >= 100, "training to reach step 100", job_id=job.job_id)
    job.cancel()
    assert helpers.wait_until_final(job.job_id).startswith("CANCELLED")
    wait_for(lambda: stops(run_dir), "the stop to be logged", 60)
    stop = stops(run_dir)[-1]
    assert stop["reason"] == "cancelled" and stop["exit_code"] == 130
    assert stop["checkpoint_step"] == stop["step"] >= 100  # state saved
    assert [s.split()[0] for s in helpers.final_sacct_states(job.job_id)] == ["CANCELLED"]  # never requeued
    assert not [e for e in read_events(run_dir) if e["event"] == "requeue"]


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_preemption_budget_exhausted_ends_failed(tmp_path, preempt_mode):
    job, run_dir = helpers.submit_training(tmp_path, TRAIN, preempt_mode, max_preemptions=0)
    helpers.preempt_at_step(job.job_id, run_dir, 50)
    assert helpers.wait_until_final(job.job_id) == "FAILED"
    last = stops(run_dir)[-1]
    assert last["reason"] == "failed" and "preemption budget exhausted" in last["message"]
    with pytest.raises(Exception, match="preemption budget exhausted"):
        job.result()


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_task_job_preempted_resumes_exactly(tmp_path, preempt_mode, parallel, request):
    """DDP (rank 0 writes) and FSDP2 (every rank writes its shard) across a real preemption."""
    # 10 s of steps: time for the scheduler to preempt at step 60 on a busy host (at 0.01 s a step the
    # run could finish first)
    train = [*DDP_TRAIN, f"trainer.parallel={parallel}", "trainer.step_sleep=0.05"]
    reference = helpers.two_rank_reference(tmp_path, train)  # the same run, uninterrupted
    job, run_dir = helpers.submit_training(tmp_path, train, preempt_mode, tasks=2)
    helpers.preempt_at_step(job.job_id, run_dir, 60)
    assert helpers.wait_until_final(job.job_id) == "COMPLETED"
    history = stops(run_dir)
    assert [s["reason"] for s in history] == ["preempted", "finished"]  # one entry per stop, not per rank
    assert history[1]["resumed_from"] == history[0]["step"] == history[0]["checkpoint_step"]
    assert len([e for e in read_events(run_dir) if e["event"] == "requeue"]) == 1  # rank 0 only
    assert helpers.final_sacct_states(job.job_id) == ["REQUEUED", "COMPLETED"]
    assert json.loads((run_dir / "result.json").read_text())["params_sha256"] == reference["params_sha256"]
    helpers.record(request.node.name, run_dir)


# Time limit 2 min, the time-limit signal 60 s before it (SLURM may send it up to a minute early).
LONG = ["trainer.max_steps=2000", "trainer.step_sleep=0.05", "trainer.log_every=100", "checkpoint.every_steps=500"]


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_time_limit_checkpoints_requeues_and_finishes(tmp_path, preempt_mode, request):
    reference = helpers.reference_result(tmp_path, LONG)
    job, run_dir = helpers.submit_training(tmp_path, LONG, preempt_mode, timeout_min=2, signal_lead_s=60)
    wait_for(lambda: stops(run_dir), "the time-limit stop", 240, job.job_id)
    # SLURM sends the signal up to a minute early: two or three starts, each requeue released at once
    assert helpers.wait_until_final(job.job_id, timeout=600, release_requeues=True) == "COMPLETED"
    history = stops(run_dir)
    assert [s["reason"] for s in history[:-1]] == ["timeout"] * (len(history) - 1) and history[-1][
        "reason"
    ] == "finished"
    assert job.result()["params_sha256"] == reference["params_sha256"]
    helpers.record(request.node.name, run_dir)


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_time_limit_budget_exhausted_ends_failed(tmp_path, preempt_mode):
    job, run_dir = helpers.submit_training(
        tmp_path, LONG, preempt_mode, timeout_min=2, signal_lead_s=60, max_timeouts=0
    )
    assert helpers.wait_until_final(job.job_id, timeout=300) == "FAILED"
    stop = stops(run_dir)[-1]
    assert stop["reason"] == "failed" and "time-limit budget exhausted" in stop["message"]
    assert stop["checkpoint_step"] == stop["step"]  # saved before failing
    assert helpers.final_sacct_states(job.job_id) == ["FAILED"]


@pytest.mark.parametrize(
    "setting, scheduler_says",
    [
        ({"qos": "no-such-qos"}, "Invalid qos specification"),
        ({"account": "no-such-account"}, "Invalid account"),
        ({"partition": "no-such-partition"}, "invalid partition"),
    ],
)
def test_bad_qos_account_partition_fail_before_anything_runs(tmp_path, slurm_cluster, setting, scheduler_says):
    kwargs = {"qos": "preemptible", "account": helpers.ACCOUNT, **setting}
    with pytest.raises(SlurmError, match=f"(?i){scheduler_says}"):
        preemptible_executor(tmp_path, **kwargs)
