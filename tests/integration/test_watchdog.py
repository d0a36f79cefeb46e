"""The hang watchdog in a real process: a step that never ends is found, its stack dumped, the run restarts."""

import os
import signal
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


def test_the_hang_names_the_checkpoint_a_background_write_finished_during_it(tmp_path):
    # step 10's state is written in the background as step 10 begins, and step 10 hangs: the write ends during
    # the hang and retention (keep_last 1) deletes step 5, which the session still took for the last one
    env = {**os.environ, "HANG_WORKER_ASYNC": "1"}
    proc = start(tmp_path, 20, 10, env=env)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.HANG, output
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-000000010"]
    stop = read_events(tmp_path)[-1]
    assert stop["reason"] == "hang" and stop["step"] == 10 and stop["checkpoint_step"] == 10
    assert "the checkpoint of step 10 stands" in stop["message"] and "step 10 stands" in output


def stopped_in_step(run_dir, release, stop_s):
    """Start a run whose step 12 waits for `release`, stop the process for `stop_s` (SIGSTOP, as SLURM's
    suspend does) while it waits, continue it (SIGCONT); returns the process and when it was continued."""
    proc = start(run_dir, 20, 12, release)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("blocking in step 12"):
            break
    proc.send_signal(signal.SIGSTOP)
    time.sleep(stop_s)  # the suspension itself: longer than the step's allowance (timeout_s=2)
    proc.send_signal(signal.SIGCONT)
    return proc, time.monotonic()


def test_time_stopped_does_not_count_as_a_hang(tmp_path):
    release = tmp_path / "release"
    proc, continued = stopped_in_step(tmp_path / "run", release, 4.0)
    # the old clock had it hung at once; now the step has used well under its 2 s since it was continued
    while time.monotonic() - continued < 1.0:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    release.touch()
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == ExitCode.FINISHED, output
    assert "hang" not in output
    assert [e["reason"] for e in read_events(tmp_path / "run") if e["event"] == "stop"] == ["finished"]


def test_after_a_stop_a_hang_is_still_found_in_the_time_the_process_ran(tmp_path):
    proc, continued = stopped_in_step(tmp_path / "run", tmp_path / "never", 4.0)
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == ExitCode.HANG, output
    ran = time.monotonic() - continued
    assert 1.0 < ran < 15, ran  # the 2 s allowance, less what the step ran before the stop, after SIGCONT
    stop = read_events(tmp_path / "run")[-1]
    assert stop["reason"] == "hang" and stop["step"] == 12
    assert "no progress for 2 s" in stop["message"] or "no progress for 3 s" in stop["message"], stop["message"]


def start_ranks(run_dir, *args, env=None):
    port = str(free_port())
    ranks = []
    for rank in range(2):
        world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2"}
        ranks.append(start(run_dir, *args, env={**(env or os.environ), **world}))
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


def fake_slurm(tmp_path, preempted_s_ago=None):
    """scontrol and sacctmgr on PATH that answer as for a running job 4242 and note every call; with
    `preempted_s_ago`, one preempted that long ago (KillWait 30 s: killed 30 s after its PreemptTime)."""
    preempt_time = f' PreemptTime=$(date -d "-{preempted_s_ago} sec" +%Y-%m-%dT%H:%M:%S)' if preempted_s_ago else ""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'case "$1 $2" in\n'
        '  "show job") echo "JobId=4242 JobState=RUNNING Restarts=0 Requeue=1 QOS=normal TimeLimit=UNLIMITED'
        f'{preempt_time}" ;;\n'
        '  "show config") printf "KillWait = 30 sec\\nPreemptMode = OFF\\n" ;;\n'
        "esac\n"
    )
    (bin_dir / "sacctmgr").write_text("#!/bin/sh\necho '00:00:00|CANCEL'\n")  # the QoS: GraceTime 0
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
