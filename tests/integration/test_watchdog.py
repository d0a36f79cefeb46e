"""The hang watchdog in a real process: a step that never ends is found, its stack dumped, the run restarts."""

import os
import subprocess
import sys
import time

import pytest

from hydra_preempt.outcome import ExitCode
from hydra_preempt.rundir import RunLog, read_events
from tests.e2e.helpers import ROOT
from tests.integration.test_multi_rank import free_port

pytestmark = pytest.mark.slow


def start(run_dir, *args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.hang_worker", str(run_dir), *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_hung_step_ends_the_process_with_its_stacks_and_a_rerun_resumes(tmp_path):
    proc = start(tmp_path, 20, 12)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("blocking in step 12"):
            break
    blocked_at = time.monotonic()
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == ExitCode.HANG, output
    assert time.monotonic() - blocked_at < 15  # timeout_s=2, polled every 0.1 s
    assert "Traceback" not in output and "hang: no progress" in output

    [stacks] = tmp_path.glob("hang-stacks-*.txt")
    text = stacks.read_text()
    assert "in the step after step 12" in text
    assert 'hang_worker.py", line' in text and "in train" in text  # the blocking frame
    assert "threading.py" in text and "in wait" in text

    stop = read_events(tmp_path)[-1]
    assert stop["event"] == "stop" and stop["reason"] == "hang" and stop["exit_code"] == ExitCode.HANG
    assert stop["step"] == 12 and stop["checkpoint_step"] == 10 and stop["stacks"] == stacks.name
    assert stop["failure"] == "hang" and stop["restart_reason"] == "hang: restart (attempt 1/3)"

    rerun = start(tmp_path, 20)
    output, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == ExitCode.FINISHED, output
    last = read_events(tmp_path)[-1]
    assert last["reason"] == "finished" and last["resumed_from"] == 10 and last["step"] == 20


def start_ranks(run_dir, *args):
    port = str(free_port())
    ranks = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2"}
        ranks.append(start(run_dir, *args, env=env))
    return ranks


def test_a_rank_that_hangs_ends_every_rank_and_the_run_resumes(tmp_path):
    ranks = start_ranks(tmp_path, 20, 12)  # rank 1 blocks in step 12, rank 0 then waits in the boundary's all-reduce
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [ExitCode.HANG, ExitCode.HANG], outputs
    [rank0] = [p.read_text() for p in tmp_path.glob("hang-stacks-*.txt") if "-rank" not in p.name]
    rank1 = next(tmp_path.glob("hang-stacks-*-rank1.txt")).read_text()
    assert "in agree" in rank0  # the boundary's collective, waiting for rank 1
    assert 'hang_worker.py", line' in rank1 and "in wait" in rank1
    [stop] = [e for e in read_events(tmp_path) if e["event"] == "stop"]  # one entry, rank 0's
    assert stop["reason"] == "hang" and stop["checkpoint_step"] == 10

    rerun = start_ranks(tmp_path, 20)
    outputs = [p.communicate(timeout=120)[0] for p in rerun]
    assert [p.returncode for p in rerun] == [ExitCode.FINISHED] * 2, outputs
    last = read_events(tmp_path)[-1]
    assert last["reason"] == "finished" and last["resumed_from"] == 10 and last["step"] == 20


def fake_slurm(tmp_path):
    """scontrol and sacctmgr on PATH that answer as for a running job 4242 and note every call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'case "$1 $2" in\n'
        '  "show job") echo "JobId=4242 JobState=RUNNING Restarts=0 Requeue=1 QOS=normal TimeLimit=UNLIMITED" ;;\n'
        '  "show config") printf "KillWait = 30 sec\\nPreemptMode = OFF\\n" ;;\n'
        "esac\n"
    )
    (bin_dir / "sacctmgr").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    return env, calls


def test_inside_slurm_a_hang_requeues_the_job_from_the_watchdog_thread(tmp_path):
    run_dir = tmp_path / "run"
    env, calls = fake_slurm(tmp_path)
    proc = start(run_dir, 20, 12, env=env)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.HANG, output
    assert "requeue 4242" in calls.read_text().splitlines()
    events = read_events(run_dir)
    assert [e["event"] for e in events[-2:]] == ["stop", "requeue"] and events[-2]["reason"] == "hang"


def test_a_hang_beyond_its_restart_budget_is_not_requeued(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for _ in range(3):  # three earlier hangs: the shipped table allows 3 restarts
        RunLog(run_dir).append("stop", reason="hang", failure="hang")
    env, calls = fake_slurm(tmp_path)
    proc = start(run_dir, 20, 12, env=env)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.HANG, output
    assert "requeue 4242" not in calls.read_text().splitlines()
    stop = read_events(run_dir)[-1]
    assert stop["reason"] == "hang" and stop["restart"] is False
    assert stop["restart_reason"] == "hang: retry budget exhausted (attempt 4/3)"
