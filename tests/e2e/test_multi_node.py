"""Two nodes of the test cluster: a user's own sbatch script starts train.py's ranks with plain `srun`, one
task per node (each node in its own network and UTS namespace, gloo between them)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest

from hydra_preempt.checkpoint.layout import MANIFEST_FILE, SHARDS_METADATA
from hydra_preempt.slurm.commands import SlurmError, sacct_states, show_job, slurm_command
from tests.integration.test_multi_rank import TRAIN as DDP_TRAIN
from tests.integration.test_multi_rank import finish, start_ranks

from . import helpers
from .helpers import stops

pytestmark = pytest.mark.slow


def submit_script(tmp_path: Path, mode: str, run_dir: Path, overrides: list[str]) -> str:
    """The sbatch script a user writes for a 2-node job; its id."""
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1 --cpus-per-task=2\n"
        "#SBATCH --requeue --open-mode=append\n"
        f"srun {sys.executable} {helpers.ROOT / 'train.py'} hydra.run.dir={run_dir} {' '.join(overrides)}\n"
    )
    args = ["sbatch", "--parsable", "-A", helpers.ACCOUNT, "-q", helpers.QOS[mode], "-p", helpers.PARTITION]
    log = tmp_path / "job.log"
    return slurm_command([*args, "-o", str(log), "-D", str(tmp_path), str(script)]).strip().split(";")[0]


@pytest.mark.parametrize("parallel, preempt_mode", [("fsdp", "CANCEL"), ("ddp", "REQUEUE")], indirect=["preempt_mode"])
def test_two_node_job_started_by_srun_is_preempted_and_resumes_exactly(tmp_path, parallel, preempt_mode, request):
    """FSDP2 (each node's rank writes its shard; the job requeues itself) and DDP (rank 0 writes; SLURM
    requeues the job at the end of the grace period)."""
    train = [*DDP_TRAIN, f"trainer.parallel={parallel}", "trainer.step_sleep=0.05"]  # 10 s: time to preempt
    codes, out = finish(start_ranks(tmp_path / "reference", train))  # the same 2-rank run, uninterrupted
    assert codes == [0, 0], out
    reference = json.loads((tmp_path / "reference" / "result.json").read_text())

    run_dir = tmp_path / "run"
    job_id = submit_script(tmp_path, preempt_mode, run_dir, train)
    helpers.preempt_at_step(job_id, run_dir, 60)
    assert helpers.wait_until_final(job_id) == "COMPLETED", (tmp_path / "job.log").read_text()
    history = stops(run_dir)
    assert [s["reason"] for s in history] == ["preempted", "finished"]  # one run of 2 ranks, not 2 copies
    assert history[1]["resumed_from"] == history[0]["step"] == history[0]["checkpoint_step"]
    expected = "PREEMPTED" if preempt_mode == "REQUEUE" else "REQUEUED"
    assert [s for s, _ in sacct_states(job_id)] == [expected, "COMPLETED"]
    saved = max((run_dir / "checkpoints").glob("step-*"))  # the final one (retention may drop the stop's)
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    if parallel == "fsdp":  # each node's rank wrote its own shard
        assert manifest["sharded"] == ["model", "optimizer"]
        assert {"shard-00000.bin", "shard-00001.bin", SHARDS_METADATA} <= set(manifest["files"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["params_sha256"] == reference["params_sha256"]
    log = (tmp_path / "job.log").read_text()
    assert "the 2 tasks of step" in log and "are one process group (gloo, at hpnode" in log, log
    assert log.count("finished at step 200") == 1, log  # rank 0 tells the events, the other ranks only warnings
    helpers.record(request.node.name, run_dir)


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_a_node_local_checkpoint_directory_is_refused_before_training(tmp_path, preempt_mode):
    """/var/tmp/node-local is each node's own tmpfs (tests/cluster): rank 1 cannot see rank 0's files."""
    run_dir = tmp_path / "run"
    job_id = submit_script(tmp_path, preempt_mode, run_dir, [*DDP_TRAIN, "checkpoint.dir=/var/tmp/node-local/ckpt"])
    assert helpers.wait_until_final(job_id) == "FAILED"
    log = (tmp_path / "job.log").read_text()
    assert "the ranks do not share the run's directories (rank 1 on hpnode" in log, log
    assert "cannot see /var/tmp/node-local/ckpt" in log
    assert not stops(run_dir)  # refused before the run began: no start, no stop


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_tasks_that_decline_a_process_group_may_not_share_a_run_directory(tmp_path, preempt_mode):
    """distributed.srun=false: the first task trains; the other is refused in one line, exit 2."""
    run_dir = tmp_path / "run"
    job_id = submit_script(tmp_path, preempt_mode, run_dir, [*DDP_TRAIN, "distributed.srun=false"])
    assert helpers.wait_until_final(job_id) == "FAILED"  # srun: one task exited 2
    log = (tmp_path / "job.log").read_text()
    assert log.count("(exit code 2): the 2 tasks of srun step") == 1 and "share run directory" in log, log
    assert [s["reason"] for s in stops(run_dir)] == ["finished"]  # the refused task never started the run
    assert (run_dir / "result.json").exists()


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_a_node_lost_mid_job_is_node_fail_and_the_requeued_job_ends_identical(tmp_path, preempt_mode, request):
    """The job's second node goes DOWN at step 60: SLURM cancels the step (SIGTERM to the rank still up
    and, here, to the other: its slurmd lives on) and requeues the job itself. The stop is node_fail with
    the state saved; the requeued job resumes there and ends as an uninterrupted run."""
    train = [*DDP_TRAIN, "trainer.step_sleep=0.05"]
    codes, out = finish(start_ranks(tmp_path / "reference", train))
    assert codes == [0, 0], out
    reference = json.loads((tmp_path / "reference" / "result.json").read_text())

    run_dir = tmp_path / "run"
    job_id = submit_script(tmp_path, preempt_mode, run_dir, train)
    helpers.wait_for(lambda: helpers.last_step(run_dir) >= 60, "training to reach step 60", job_id=job_id)
    nodes = slurm_command(["scontrol", "show", "hostnames", show_job(job_id).fields["NodeList"]]).split()
    slurm_command(["scontrol", "update", f"NodeName={nodes[1]}", "State=DOWN", "Reason=lost-by-a-test"])
    try:
        helpers.wait_for(lambda: stops(run_dir), "the node failure's stop", 120, job_id)
    finally:
        with contextlib.suppress(SlurmError):  # ReturnToService=2 may have brought it back already
            slurm_command(["scontrol", "update", f"NodeName={nodes[1]}", "State=RESUME"])
    assert helpers.wait_until_final(job_id, release_requeues=True) == "COMPLETED", (tmp_path / "job.log").read_text()
    first, last = stops(run_dir)
    assert (first["reason"], first["failure"], first["restart"]) == ("failed", "node_fail", True), first
    assert first["evidence"].startswith("scontrol: Restarts 0 -> 1") and first["checkpoint_step"] == first["step"]
    assert last["reason"] == "finished" and last["resumed_from"] == first["step"]  # no step lost
    states = [s for s, _ in sacct_states(job_id)]
    assert states[0] == "NODE_FAIL" and states[-1] == "COMPLETED", states
    assert json.loads((run_dir / "result.json").read_text())["params_sha256"] == reference["params_sha256"]
