import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e import helpers as e2e


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real tmpfs of a given size (root only): a file system that can really fill up."""
    mounts = []

    def mount(size: str, options: str = "") -> Path:
        target = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
        target.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture(autouse=True)
def _no_stray_signal_handlers():
    """Every test must leave the process's signal handlers as it found them."""
    import signal

    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
    before = {s: signal.getsignal(s) for s in watched}
    yield
    after = {s: signal.getsignal(s) for s in watched}
    assert after == before, "a test left a signal handler installed"


def pytest_collection_modifyitems(items):
    """The longest tests first (LONGEST_FIRST), then the rest in their order.

    With pytest-xdist's load scheduling and `--maxschedchunk 1` (pyproject.toml), each worker holds two
    tests at a time and takes the next when one ends, so the long waits on SLURM spread over the
    workers from the start instead of queueing behind each other on one.
    """

    def rank(item) -> int:
        return next((i for i, name in enumerate(LONGEST_FIRST) if name in item.nodeid), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


# Test names (substrings of their ids), longest first as `make test` measures them (pytest's
# --durations): the end-to-end tests, and the integration tests of more than 30 s.
LONGEST_FIRST = [
    "test_sweep_with_two_preempted_jobs",
    "test_sigkill_during_saves_never_leaves_an_unloadable_latest",
    "test_a_two_node_experiment_of_the_snakemake_workflow",
    "test_time_limit_inside_snakemake",
    "test_time_limit_checkpoints_requeues_and_finishes",
    "test_preempted_twice_resumes_exactly",
    "test_preempted_experiment_resumes",
    "test_killed_snakemake_started_again",
    "test_time_limit_budget_exhausted",
    "test_each_kind_of_failure_is_classified",
    "test_two_task_job_preempted_resumes_exactly",
    "test_two_node_job_started_by_srun",
    "test_a_node_lost_mid_job",
    "test_a_two_node_job_of_the_hydra_launcher",
    "test_finished_runs_exit_zero_every_time",
    "test_validate_slurm_passes_on_the_test_cluster",
    "test_fsdp2_every_rank_writes_its_shard_and_a_signal_resumes_exactly",
    "test_rerun_resumes_an_unfinished_job_from_its_checkpoint",
    "test_a_trainer_program_stopped_twice_by_its_process_group",
    "test_a_lightning_program_stopped_twice_by_its_process_group",
    "test_signal_to_one_rank_stops_all_and_resumes_exactly",
    "test_a_rank_that_cannot_write_stops_every_rank",
    "test_local_sweep_survives_a_signal_and_a_rerun_submits_nothing",
    "test_validate_passes_here_and_fails_only_the_disk_rows",
    "test_every_section_runs_on_the_cpu_and_reports_its_figures",
    "test_every_hostile_edit_is_refused_by_export",
    "test_a_stop_passes_through_the_agent_to_the_ranks",
    "test_two_ranks_under_torchrun_stopped_mid_epoch",
    "test_persistent_validation_workers_leave_a_resumed_training_exact",
    "tests/e2e/",
]


# The end-to-end tests' preemption figures (tests/e2e/helpers.record) are printed at the end of the
# run. Under pytest-xdist each worker sends its own to the controller, which prints them all.
def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["preemption_measurements"] = json.dumps(e2e.MEASUREMENTS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    e2e.MEASUREMENTS.extend(json.loads(getattr(node, "workeroutput", {}).get("preemption_measurements", "[]")))


def pytest_terminal_summary(terminalreporter):
    if e2e.MEASUREMENTS:
        terminalreporter.section("preemption measurements (end-to-end, real SLURM)")
        for line in e2e.measurement_lines():
            terminalreporter.write_line(line)
