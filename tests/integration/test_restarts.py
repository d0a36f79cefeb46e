"""In-job restart policy: an exception whose text is a restartable class (NCCL) ends like a preemption
(exit 75) within its budget, then fails with the reason; other exceptions fail as before, classified."""

import pytest
import torch
import torch.distributed as dist

from hydra_preempt import ExitCode, JobContext, SessionConfig, Status, run
from hydra_preempt.config import FailuresConfig
from hydra_preempt.rundir import RunHistory, read_events
from tests.integration.test_watchdog import start_ranks

NCCL_TEXT = (
    "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, unhandled system error "
    "(run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5"
)
NO_SLURM = JobContext(slurm_task=None)


def trainer(fail_at, error):
    def train(session):
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        session.register(model=model, optimizer=opt)
        for step in session.steps(12):
            if step == fail_at:
                raise error
            loss = model(torch.ones(2, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            session.report(loss=loss)

    return train


def config(tmp_path, max_restarts=None):
    sections = {"checkpoint": {"every_steps": 3, "async_save": False}}
    if max_restarts is not None:
        table = tmp_path / "failures.yaml"
        table.write_text(
            "classes:\n  - name: nccl\n    log_patterns: ['DistBackendError: NCCL error']\n"
            f"    restart: true\n    max_restarts: {max_restarts}\n"
        )
        sections["failures"] = {"table": str(table)}
    return SessionConfig.from_mapping(sections)


def test_an_nccl_error_requeues_within_its_budget_then_fails_with_the_reason(tmp_path):
    run_dir = tmp_path / "run"
    error = dist.DistBackendError(NCCL_TEXT)
    first = run(trainer(7, error), run_dir, config(tmp_path, max_restarts=1), NO_SLURM)
    assert (first.status, first.exit_code, first.failure) == (Status.FAILED, ExitCode.REQUEUE, "nccl")
    assert first.restart_reason == "nccl: restart (attempt 1/1)" and first.requeue_by == "self"
    stop = read_events(run_dir)[-1]
    assert stop["failure"] == "nccl" and stop["exit_code"] == ExitCode.REQUEUE and stop["restart"] is True
    assert "DistBackendError: NCCL error in:" in stop["evidence"]

    second = run(trainer(9, error), run_dir, config(tmp_path, max_restarts=1), NO_SLURM)
    assert (second.exit_code, second.restart_reason) == (ExitCode.FAILED, "nccl: retry budget exhausted (attempt 2/1)")
    assert second.message.endswith("nccl: retry budget exhausted (attempt 2/1)")
    assert RunHistory.read(run_dir).failure_count("nccl") == 2


def test_an_ordinary_exception_fails_classified_as_a_user_exception(tmp_path):
    outcome = run(trainer(5, ValueError("bad batch")), tmp_path / "run", config(tmp_path), NO_SLURM)
    assert (outcome.exit_code, outcome.failure) == (ExitCode.FAILED, "user_exception")
    assert outcome.message.startswith("ValueError: bad batch") and "user_exception: not restarted" in outcome.message


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()], ids=["sys.exit", "KeyboardInterrupt"])
def test_a_training_function_that_exits_by_itself_is_written_down_as_a_user_exception(tmp_path, error):
    """Not a run that stopped without a word (which a monitor takes for a killed one and restarts)."""
    run_dir = tmp_path / "run"
    outcome = run(trainer(5, error), run_dir, config(tmp_path), NO_SLURM)
    assert (outcome.status, outcome.exit_code, outcome.failure) == (Status.FAILED, ExitCode.FAILED, "user_exception")
    assert outcome.message.startswith(type(error).__name__) and "emergency checkpoint at step 5" in outcome.message
    stop = read_events(run_dir)[-1]
    assert (stop["event"], stop["failure"], stop["restart"], stop["checkpoint_step"]) == (
        "stop",
        "user_exception",
        False,
        5,
    )


def test_a_cuda_oom_is_not_restarted(tmp_path):
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total capacity)")
    outcome = run(trainer(5, error), tmp_path / "run", config(tmp_path), NO_SLURM)
    assert (outcome.exit_code, outcome.failure, outcome.restart_reason) == (
        ExitCode.FAILED,
        "cuda_oom",
        "cuda_oom: not restarted",
    )


def test_a_malformed_failure_table_is_a_usage_error_before_anything_runs(tmp_path):
    table = tmp_path / "bad.yaml"
    table.write_text("classes:\n  - name: nccl\n    restart: maybe\n")
    config = SessionConfig(failures=FailuresConfig(table=str(table)))
    outcome = run(trainer(5, ValueError("never")), tmp_path / "run", config, NO_SLURM)
    assert outcome.exit_code == ExitCode.USAGE and "classes[0] (nccl): restart must be true or false" in outcome.message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_the_loss_of_a_peer_and_the_run_restarts(tmp_path):
    ranks = start_ranks(tmp_path, 20, 12)  # rank 1 blocks in step 12, rank 0 waits for it in the boundary's all-reduce
    assert ranks[1].stdout is not None
    for line in ranks[1].stdout:
        if line.startswith("blocking in step 12"):
            break
    ranks[1].kill()  # SIGKILL: a host OOM kill, a lost node
    output = ranks[0].communicate(timeout=120)[0]
    ranks[1].wait(timeout=60)
    assert ranks[0].returncode == ExitCode.REQUEUE, output
    stop = read_events(tmp_path)[-1]
    assert stop["reason"] == "failed" and stop["failure"] == "peer_lost", stop
    assert stop["restart"] is True and stop["restart_reason"] == "peer_lost: restart (attempt 1/3)"
    assert "gloo" in stop["evidence"] and "by peer" in stop["evidence"]

    rerun = start_ranks(tmp_path, 20)
    outputs = [p.communicate(timeout=120)[0] for p in rerun]
    assert [p.returncode for p in rerun] == [ExitCode.FINISHED] * 2, outputs
    last = read_events(tmp_path)[-1]
    assert last["reason"] == "finished" and last["resumed_from"] == 10 and last["step"] == 20
