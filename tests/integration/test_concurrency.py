"""Two processes and one run: nothing is touched before the run lock is held, a checkpoint directory
belongs to one run, and the run's id and temporaries are handled under the lock."""

import signal
import subprocess
import sys
import time

from hydra_preempt import ExitCode, Status, run
from hydra_preempt.rundir import RUN_ID_FILE, RunLock, read_events
from tests.integration.test_session import config, trainer

WAITING_RUN = "import sys; from hydra_preempt import run; sys.exit(run(lambda s: None, sys.argv[1]).exit_code)"


def test_a_duplicate_job_touches_nothing_while_it_waits_for_the_run_lock(tmp_path):
    """The live job's save in progress (from any host) survives a duplicate that starts meanwhile."""
    live = RunLock(tmp_path)
    assert live.acquire(lambda: False, lambda holder: None)
    in_progress = tmp_path / "checkpoints" / ".tmp-step-000000005.otherhost.123"
    in_progress.mkdir(parents=True)
    (tmp_path / ".result.json.tmp-99").write_text("{")
    duplicate = subprocess.Popen([sys.executable, "-c", WAITING_RUN, str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        waited = ""
        while "waiting for it to end" not in waited:  # the duplicate logs once that it waits
            line = duplicate.stderr.readline()
            assert line, "the duplicate ended without waiting"
            waited += line
        assert in_progress.exists() and (tmp_path / ".result.json.tmp-99").exists()
        assert not (tmp_path / RUN_ID_FILE).exists()
        duplicate.send_signal(signal.SIGTERM)  # a preemption while waiting: it leaves the run alone
        assert duplicate.wait(timeout=60) == ExitCode.REQUEUE
    finally:
        duplicate.kill()
        live.release()
    assert in_progress.exists() and read_events(tmp_path) == []
    assert run(trainer(3), tmp_path, config()).status is Status.FINISHED  # now the lock is free: cleaned
    assert not in_progress.exists() and not (tmp_path / ".result.json.tmp-99").exists()


def test_two_runs_cannot_share_a_checkpoint_directory(tmp_path):
    shared = {"checkpoint": {"dir": str(tmp_path / "shared")}}
    first = run(trainer(10), tmp_path / "a", config(**shared))
    assert first.status is Status.FINISHED
    before = sorted(p.name for p in (tmp_path / "shared").iterdir())
    second = run(trainer(20), tmp_path / "b", config(**shared))
    assert (second.status, second.exit_code) == (Status.FAILED, ExitCode.USAGE)
    assert f"belongs to another run ({tmp_path / 'a'}" in second.message
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == before


def test_the_run_id_is_made_once_and_kept_across_restarts(tmp_path):
    seen = []

    def train(session):
        seen.append(session.run_id)
        return trainer(5)(session)

    run(train, tmp_path, config())
    started = time.time()
    run(train, tmp_path, config())
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) == 32
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == seen[0]
    assert (tmp_path / RUN_ID_FILE).stat().st_mtime < started
