"""Two nodes of the test cluster: a user's own sbatch script starts train.py's ranks with plain `srun`, one
task per node (each node in its own network and UTS namespace, gloo between them)."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hydra_preempt.checkpoint.layout import MANIFEST_FILE, SHARDS_METADATA
from hydra_preempt.slurm.commands import SlurmError, show_job, slurm_command
from tests.integration.test_multi_rank import TRAIN as DDP_TRAIN

from . import helpers
from .helpers import stops, wait_for
from .test_hydra_sweep import manifest_jobs
from .test_snakemake_slurm import start_snakemake, started_job_id

pytestmark = pytest.mark.slow


def submit_script(tmp_path: Path, mode: str, run_dir: Path, overrides: list[str], nodes: int = 2) -> str:
    """The sbatch script a user writes for a job of `nodes` nodes (0: one node, train.py started by the
    batch script itself, without srun); its id."""
    script = tmp_path / "job.sh"
    launcher = "srun " if nodes else ""
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes={max(nodes, 1)} --ntasks-per-node=1 --cpus-per-task=2\n"
        "#SBATCH --requeue --open-mode=append\n"
        f"{launcher}{sys.executable} {helpers.ROOT / 'train.py'} hydra.run.dir={run_dir} {' '.join(overrides)}\n"
    )
    args = ["sbatch", "--parsable", "-A", helpers.ACCOUNT, "-q", helpers.QOS[mode], "-p", helpers.PARTITION]
    log = tmp_path / "job.log"
    return slurm_command([*args, "-o", str(log), "-D", str(tmp_path), str(script)]).strip().split(";")[0]


def check_preempted_once_and_exact(run_dir: Path, reference: dict, sharded: bool) -> None:
    """One run of 2 ranks (not 2 copies): preempted, resumed at the step it saved, ended as the reference."""
    history = stops(run_dir)
    assert [s["reason"] for s in history] == ["preempted", "finished"], history
    assert history[1]["resumed_from"] == history[0]["step"] == history[0]["checkpoint_step"]
    saved = max((run_dir / "checkpoints").glob("step-*"))  # the final one (retention may drop the stop's)
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    if sharded:  # each node's rank wrote its own shard
        assert manifest["sharded"] == ["model", "optimizer"]
        assert {"shard-00000.bin", "shard-00001.bin", SHARDS_METADATA} <= set(manifest["files"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["params_sha256"] == reference["params_sha256"]


@pytest.mark.parametrize("parallel, preempt_mode", [("fsdp", "CANCEL"), ("ddp", "REQUEUE")], indirect=["preempt_mode"])
def test_two_node_job_started_by_srun_is_preempted_and_resumes_exactly(tmp_path, parallel, preempt_mode, request):
    """FSDP2 (each node's rank writes its shard; the job requeues itself) and DDP (rank 0 writes; SLURM
    requeues the job at the end of the grace period)."""
    train = [*DDP_TRAIN, f"trainer.parallel={parallel}", "trainer.step_sleep=0.05"]  # 10 s: time to preempt
    reference = helpers.two_rank_reference(tmp_path, train)
    run_dir = tmp_path / "run"
    job_id = submit_script(tmp_path, preempt_mode, run_dir, train)
    helpers.preempt_at_step(job_id, run_dir, 60)
    assert helpers.wait_until_final(job_id) == "COMPLETED", (tmp_path / "job.log").read_text()
    check_preempted_once_and_exact(run_dir, reference, sharded=parallel == "fsdp")
    expected = "PREEMPTED" if preempt_mode == "REQUEUE" else "REQUEUED"
    assert helpers.final_sacct_states(job_id) == [expected, "COMPLETED"]
    log = (tmp_path / "job.log").read_text()
    assert "the 2 tasks of step" in log and "are one process group (gloo, at hpnode" in log, log
    assert log.count("finished at step 200") == 1, log  # rank 0 tells the events, the other ranks only warnings
    assert BATCH_STEP_WARNING not in log
    helpers.record(request.node.name, run_dir)


BATCH_STEP_WARNING = "this process was started outside a job step of job"


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_a_run_the_batch_script_starts_without_srun_warns_that_no_preemption_signal_reaches_it(tmp_path, preempt_mode):
    job_id = submit_script(tmp_path, preempt_mode, tmp_path / "run", ["trainer.max_steps=5"], nodes=0)
    assert helpers.wait_until_final(job_id) == "COMPLETED", (tmp_path / "job.log").read_text()
    log = (tmp_path / "job.log").read_text()
    assert log.count(BATCH_STEP_WARNING) == 1 and "start it as `srun python ...`" in log, log


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_a_node_local_checkpoint_directory_is_refused_before_training(tmp_path, preempt_mode):
    """/var/tmp/node-local is each node's own tmpfs (tests/cluster): rank 1 cannot see rank 0's files."""
    run_dir = tmp_path / "run"
    # a directory of this test run's own: the node-local tmpfs outlives a test run while the cluster stays up
    node_local = f"/var/tmp/node-local/ckpt-{secrets.token_hex(4)}"
    job_id = submit_script(tmp_path, preempt_mode, run_dir, [*DDP_TRAIN, f"checkpoint.dir={node_local}"])
    assert helpers.wait_until_final(job_id) == "FAILED"
    log = (tmp_path / "job.log").read_text()
    assert "the ranks do not share the run's directories (rank 1 on hpnode" in log, log
    assert f"cannot see {node_local}" in log
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
    reference = helpers.two_rank_reference(tmp_path, train)

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
    states = helpers.final_sacct_states(job_id)
    assert states[0] == "NODE_FAIL" and states[-1] == "COMPLETED", states
    assert json.loads((run_dir / "result.json").read_text())["params_sha256"] == reference["params_sha256"]


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_a_two_node_job_of_the_hydra_launcher_is_preempted_and_resumes_exactly(tmp_path, preempt_mode, request):
    """`python train.py -m hydra/launcher=preempt_slurm hydra.launcher.nodes=2`: submitit starts one task per
    node; the launcher forms their process group; FSDP2 shards on both nodes; the job requeues itself."""
    train = [*DDP_TRAIN, "trainer.parallel=fsdp", "trainer.step_sleep=0.05"]
    reference = helpers.two_rank_reference(tmp_path, train)
    sweep_dir = tmp_path / "sweep"
    launcher = [
        "hydra/launcher=preempt_slurm",
        f"hydra.launcher.account={helpers.ACCOUNT}",
        f"hydra.launcher.partition={helpers.PARTITION}",
        f"hydra.launcher.qos={helpers.QOS[preempt_mode]}",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=2",  # whole nodes: a 2-CPU high-priority job preempts it
        "hydra.launcher.timeout_min=20",
    ]
    command = [sys.executable, "train.py", "-m", *launcher, f"hydra.sweep.dir={sweep_dir}", *train]
    sweep = subprocess.Popen(command, cwd=helpers.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (job,) = wait_for(lambda: manifest_jobs(sweep_dir), "the sweep manifest", 120)
    run_dir = Path(job["dir"])
    helpers.preempt_at_step(job["job_id"], run_dir, 60)
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out
    check_preempted_once_and_exact(run_dir, reference, sharded=True)
    assert helpers.final_sacct_states(job["job_id"]) == ["REQUEUED", "COMPLETED"]
    helpers.record(request.node.name, run_dir)


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_a_two_node_experiment_of_the_snakemake_workflow_is_preempted_and_resumes_exactly(
    tmp_path, preempt_mode, request
):
    """`nodes: 2` in the grid: the rule's job runs `srun python ...` over both nodes (DDP); preempted under
    PreemptMode=CANCEL, rank 0 requeues the job from inside the workflow's job, and the workflow completes
    with the result of an uninterrupted run."""
    train = {"trainer.max_steps": 200, "trainer.step_sleep": 0.05, "checkpoint.every_steps": 50}
    reference = helpers.two_rank_reference(tmp_path, [f"{k}={v}" for k, v in train.items()])
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "runs_dir": str(tmp_path / "runs"),
                "results_dir": str(tmp_path / "results"),
                "nodes": 2,
                "cpus_per_task": 2,  # whole nodes
                "runtime_min": 20,
                "common_overrides": {**train, "trainer.parallel": "ddp"},
                "experiments": [{"name": "wide"}],
            }
        )
    )
    workflow = start_snakemake(grid, mode=preempt_mode)
    run_dir = tmp_path / "runs" / "wide"
    job_id = started_job_id(run_dir)
    helpers.preempt_at_step(job_id, run_dir, 60)
    out, _ = workflow.communicate(timeout=600)
    assert workflow.returncode == 0, out
    check_preempted_once_and_exact(run_dir, reference, sharded=False)
    assert helpers.final_sacct_states(job_id) == ["REQUEUED", "COMPLETED"]
    nodes = slurm_command(["sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "NNodes"]).split()
    assert nodes == ["2", "2"], nodes  # both starts of the job held both nodes
    helpers.record(request.node.name, run_dir)
