"""Stop signals the training thread cannot answer at a step boundary, in real processes with real signals:
a step stuck after the signal (user code, a collective whose peer died) and a signal during start-up."""

import os
import signal
import subprocess
import sys
import time

import pytest

from hydra_preempt.outcome import ExitCode
from hydra_preempt.rundir import read_events
from tests.integration.test_watchdog import fake_slurm, start, start_ranks

pytestmark = pytest.mark.slow

GRACE_S = 4.0


@pytest.fixture
def ending():
    """Processes to end after the test (killed if still running: on old code they wait forever)."""
    procs = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def wait_for_line(proc, prefix):
    """Read the process's output up to the first line that starts with `prefix`; that line."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the process ended without a line {prefix!r}")


def test_a_stop_while_the_step_sleeps_forever_ends_with_a_stop_naming_the_standing_checkpoint(tmp_path, ending):
    proc = start(tmp_path, 20, 12, env={**os.environ, "HANG_WORKER_GRACE_S": str(GRACE_S)})
    ending(proc)
    wait_for_line(proc, "blocking in step 12")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.REQUEUE, output
    assert time.monotonic() - signalled < GRACE_S, output  # before the kill a grace of GRACE_S would bring
    assert "Traceback" not in output
    stop = read_events(tmp_path)[-1]
    assert stop["event"] == "stop" and stop["reason"] == "preempted" and stop["exit_code"] == ExitCode.REQUEUE
    assert stop["step"] == 12 and stop["checkpoint_step"] == 10
    message = stop["message"]
    assert "SIGTERM received: nothing saved: the training thread did not reach a step boundary" in message
    assert "stuck in the step after step 12, in train (hang_worker.py:" in message
    assert "the checkpoint of step 10 stands" in message
    assert "in train" in (tmp_path / stop["stacks"]).read_text()


def test_inside_slurm_a_stuck_preemption_is_requeued_from_the_watchdog_thread(tmp_path, ending):
    run_dir = tmp_path / "run"
    env, calls = fake_slurm(tmp_path, preempted_s_ago=int(30 - GRACE_S))  # the kill: GRACE_S after each look
    proc = start(run_dir, 20, 12, env={**env, "HANG_WORKER_GRACE_S": str(GRACE_S)})
    ending(proc)
    wait_for_line(proc, "blocking in step 12")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.REQUEUE, output
    assert "requeue 4242" in calls.read_text().splitlines()
    stop, requeue = read_events(run_dir)[-2:]
    assert stop["event"] == "stop" and stop["reason"] == "preempted" and stop["checkpoint_step"] == 10
    assert stop["message"].startswith("preempted: SIGTERM received: nothing saved") and "requeueing" in stop["message"]
    assert requeue["event"] == "requeue"


def test_a_stop_while_the_peer_of_a_collective_was_killed_ends_the_survivor_in_time(tmp_path, ending):
    # rank 1 blocks in step 12 with a child holding its sockets: SIGKILLed, it leaves rank 0 waiting in
    # the boundary's all-reduce for good (gloo's timeout is 30 min), as a forked DataLoader worker does
    env = {**os.environ, "HANG_WORKER_GRACE_S": str(GRACE_S), "HANG_WORKER_HOLD_SOCKETS": "1"}
    rank0, rank1 = start_ranks(tmp_path, 20, 12, env=env)
    ending(rank0)
    ending(rank1)
    holder = int(wait_for_line(rank1, "sockets held by pid").split()[-1])
    try:
        wait_for_line(rank1, "blocking in step 12")
        wait_for_line(rank0, "step 13")  # then into the all-reduce that waits for rank 1
        rank1.kill()
        rank1.wait(timeout=30)
        signalled = time.monotonic()
        rank0.send_signal(signal.SIGTERM)
        output, _ = rank0.communicate(timeout=30)
        assert rank0.returncode == ExitCode.REQUEUE, output
        assert time.monotonic() - signalled < GRACE_S, output
    finally:
        os.kill(holder, signal.SIGKILL)
    stop = read_events(tmp_path)[-1]
    assert stop["event"] == "stop" and stop["reason"] == "preempted" and stop["checkpoint_step"] == 10
    assert "did not reach a step boundary (stuck in the step after step 13, in all_reduce (" in stop["message"]


def test_a_stop_during_start_up_is_a_stop_with_nothing_saved(tmp_path, ending):
    # the failure table is a FIFO: run() waits in reading it, a step of its start-up, until the test writes it
    table = tmp_path / "failures.yaml"
    os.mkfifo(table)
    run_dir = tmp_path / "run"
    proc = start(run_dir, 20, env={**os.environ, "HANG_WORKER_TABLE": str(table)})
    ending(proc)
    while True:  # a writer can open the FIFO without blocking once its reader, run(), has it open
        try:
            writer = os.open(table, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    with open(writer, "w") as f:
        f.write("classes:\n  - name: preempted\n    last_stops: [preempted]\n    restart: true\n")
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.REQUEUE, output
    assert "preempted at step 0" in output
    stop = read_events(run_dir)[-1]
    assert stop["event"] == "stop" and stop["reason"] == "preempted" and stop["step"] == 0
    assert stop["message"] == "SIGTERM received during start-up: nothing saved, no checkpoint yet"
    assert stop["checkpoint_step"] is None


# A healthy run that terminates a forked child: the child inherits the wakeup pipe and the handlers,
# so the SIGTERM sent to it is written into the pipe the watchdog reads.
FORKS_AND_TERMINATES_A_CHILD = """
import multiprocessing, sys, time
from hydra_preempt import exit_with, run

def train(session):
    for step in session.steps(120):
        if step == 10:
            child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60.0,))
            child.start()
            child.terminate()  # SIGTERM to the child alone
            child.join()
            print("child ended", child.exitcode, flush=True)
            with multiprocessing.get_context("fork").Pool(2) as pool:  # leaving it terminates the workers
                print("pool said", pool.map(abs, [-1, -2]), flush=True)
        time.sleep(0.02)
        session.report(loss=1.0)
    return {"steps": 120}

exit_with(run(train, sys.argv[1], {"signals": {"grace_s": 8.0}, "checkpoint": {"every_steps": 50}}))
"""


def test_a_sigterm_to_a_forked_child_does_not_end_the_healthy_run(tmp_path):
    """Its signal reaches the shared pipe, never this process's handler, while the main thread runs on:
    a forked child gets the signal handlers of before run() back and no wakeup pipe (else it ignored
    SIGTERM, and the parent took the child's SIGTERM as its own stop and ended with nothing saved)."""
    done = subprocess.run(
        [sys.executable, "-c", FORKS_AND_TERMINATES_A_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == ExitCode.FINISHED, done.stdout + done.stderr
    assert "child ended -15" in done.stdout  # SIGTERM ends it: it has the handlers of before run() again
    assert "pool said [1, 2]" in done.stdout
    assert [e["reason"] for e in read_events(tmp_path) if e["event"] == "stop"] == ["finished"]


# A long step (3 s, a slow evaluation) interrupted with Ctrl-C, in a terminal or a notebook: no kill is
# coming, so the stop waits for the boundary as long as it takes, and saves there.
INTERRUPTED_IN_A_LONG_STEP = """
import sys, time
from hydra_preempt import exit_with, run

def train(session):
    for step in session.steps(3):
        if step == 1:
            print("long step", flush=True)
            time.sleep(3.0)
        session.report(loss=1.0)
    return {}

exit_with(run(train, sys.argv[1], {"signals": {"grace_s": 1.0}}))
"""


def test_ctrl_c_without_a_kill_coming_waits_for_the_boundary_and_saves(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_IN_A_LONG_STEP, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_line(proc, "long step")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.CANCELLED, output
    stop = read_events(tmp_path)[-1]
    assert stop["reason"] == "cancelled" and stop["checkpoint_step"] == stop["step"] == 2, stop  # saved there
    assert "nothing saved" not in output


# A script whose first import is the start-up guard; it waits for the test's go-ahead where its slow
# imports (torch) would run, so that the signal lands before run() installs its handlers.
GUARDED_START = """
import hydra_preempt.guard
import multiprocessing, sys, time
helper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
helper.start()  # forked before run(): no training run, terminate() ends it
helper.terminate()
helper.join(10)
print("helper ended", helper.exitcode, flush=True)
print("guarded", flush=True)
sys.stdin.readline()
from hydra_preempt import exit_with, run

def train(session):
    for _ in session.steps(5):
        pass
    return {}

exit_with(run(train, sys.argv[1]))
"""


def test_a_stop_signal_before_run_is_kept_by_the_guard_and_stops_the_run_at_its_start(tmp_path, ending):
    proc = subprocess.Popen(
        [sys.executable, "-c", GUARDED_START, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ending(proc)
    assert wait_for_line(proc, "helper ended") == "helper ended -15\n"
    wait_for_line(proc, "guarded")
    os.killpg(proc.pid, signal.SIGTERM)  # as slurmstepd sends it, to the whole step
    output, _ = proc.communicate("go\n", timeout=60)
    assert proc.returncode == ExitCode.REQUEUE, output
    assert "[hydra_preempt] SIGTERM during start-up: the run stops as soon as run() starts" in output
    stop = read_events(tmp_path)[-1]
    assert (stop["reason"], stop["message"]) == (
        "preempted",
        "SIGTERM received during start-up: nothing saved, no checkpoint yet",
    )
