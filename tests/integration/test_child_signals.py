"""A stop signal reaches every process of a job step (slurmstepd signals them all): the run's children
never fail the run, and the program's own signal handlers never silence a stop.

In-process runs; the signals are real and come from another process (`kill`), to this process and every
process it started, as slurmstepd sends them. The DataLoader workers of every loader kind:
test_own_script.py; whole processes signalled through their process group: test_own_script.py,
test_train_process.py and the e2e tests.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hydra_preempt import ExitCode, SessionConfig, Status, run
from hydra_preempt.rundir import read_events
from tools.train_process import signal_like_slurmstepd

CONFIG = SessionConfig.from_mapping({"checkpoint": {"every_steps": 4}})
STEPS = 12


def training(at: int | None = None, action=None):
    """A small model over 12 steps; at step `at` (0-based), `action(session, update)` runs inside the step,
    where `update()` is the step's optimizer update (called by the action when it wants it earlier)."""

    def train(session):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        session.register(model=model, optimizer=optimizer)
        session.restore()
        for step in session.steps(STEPS):
            updated = False

            def update():
                nonlocal updated
                x = torch.randn(16, 4)
                loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                updated = True

            if step == at and session.resumed_from is None and action is not None:
                action(session, update)
            if not updated:
                update()
        return {"params": [p.detach().tolist() for p in model.parameters()]}

    return train


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    outcome = run(training(), tmp_path_factory.mktemp("reference"), CONFIG)
    assert outcome.exit_code == ExitCode.FINISHED, outcome.message
    return outcome.result


def a_subprocess_dies_of_it(session, update):
    """A step that waits on a command; the command dies of the scheduler's SIGTERM and the step raises."""
    child = subprocess.Popen(["sleep", "60"])
    signal_like_slurmstepd(signal.SIGTERM)
    if child.wait() != 0:
        raise subprocess.CalledProcessError(child.returncode, child.args)


def updated_then_a_subprocess_dies_of_it(session, update):
    update()
    a_subprocess_dies_of_it(session, update)


def a_subprocess_dies_of_a_checkpoint_request(session, update):
    """SIGUSR1 (save, keep training) kills a command too: the run cannot go on past the exception."""
    child = subprocess.Popen(["sleep", "60"])
    signal_like_slurmstepd(signal.SIGUSR1)
    if child.wait() != 0:
        raise subprocess.CalledProcessError(child.returncode, child.args)


@pytest.mark.parametrize(
    "action,saved,said",
    [
        (a_subprocess_dies_of_it, 6, "SIGTERM received: state saved at step 6"),  # the update had not run
        (updated_then_a_subprocess_dies_of_it, 4, "SIGTERM received: the checkpoint of step 4 stands (2 steps lost)"),
        (a_subprocess_dies_of_a_checkpoint_request, 6, "SIGUSR1 received: state saved at step 6"),
    ],
)
def test_a_child_that_dies_of_the_stop_signal_is_that_stop_and_the_resume_is_exact(
    tmp_path, reference, caplog, action, saved, said
):
    outcome = run(training(at=6, action=action), tmp_path, CONFIG)
    assert (outcome.status, outcome.exit_code) == (Status.PREEMPTED, ExitCode.REQUEUE), outcome.message
    assert outcome.message.startswith(f"{said}; the step raised CalledProcessError"), outcome
    assert "Traceback (most recent call last)" in caplog.text  # in case it was a bug of the step's own
    stop = read_events(tmp_path)[-1]
    assert (stop["reason"], stop["checkpoint_step"], stop.get("failure")) == ("preempted", saved, None)
    final = run(training(), tmp_path, CONFIG)
    assert final.exit_code == ExitCode.FINISHED and final.result == reference


def a_pool_serves_through_the_signal(session, update):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(abs, [-1, -2]) == [1, 2]
        signal_like_slurmstepd(signal.SIGTERM)  # the pool's workers too
        assert pool.map(abs, [-3, -4]) == [3, 4]  # they are alive: a dead one would hang this map


def the_program_takes_sigterm(session, update):
    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def asyncio_takes_sigterm(session, update):
    loop = asyncio.new_event_loop()
    session.loop = loop  # closed by the test
    loop.add_signal_handler(signal.SIGTERM, lambda: None)


def signalled_after(taker):
    """At step 2 `taker` replaces the SIGTERM handler; SIGTERM comes at step 6."""

    def action(session, update):
        if session.step == 2:
            taker(session, update)
        elif session.step == 6:
            signal_like_slurmstepd(signal.SIGTERM)

    return action


@pytest.mark.parametrize("taker", [the_program_takes_sigterm, asyncio_takes_sigterm])
def test_a_handler_the_program_installs_after_run_started_is_taken_back_and_the_stop_saves(tmp_path, caplog, taker):
    outcome = run(every_step(signalled_after(taker)), tmp_path, CONFIG)
    assert outcome.exit_code == ExitCode.REQUEUE, outcome.message
    assert outcome.message == "SIGTERM received: state saved at step 7", outcome.message
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "SIGTERM handler" in r.message]
    assert len(warned) == 1 and "taken back" in warned[0], warned


def every_step(action):
    """A small training function whose `action(session, None)` runs at every step."""

    def train(session):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        session.register(model=model, optimizer=optimizer)
        session.restore()
        try:
            for _ in session.steps(STEPS):
                action(session, None)
                loss = model(torch.randn(8, 4)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            loop = getattr(session, "loop", None)
            if loop is not None:
                loop.close()
        return {}

    return train


def test_a_fork_pool_keeps_serving_through_the_stop_signal_and_the_stop_saves(tmp_path, reference):
    outcome = run(training(at=6, action=a_pool_serves_through_the_signal), tmp_path, CONFIG)
    assert outcome.message == "SIGTERM received: state saved at step 7", outcome.message
    assert not multiprocessing.active_children()
    final = run(training(), tmp_path, CONFIG)
    assert final.result == reference


def test_a_run_inside_a_run_passes_the_outer_run_its_stop(tmp_path):
    inner_outcomes = []

    def inner(session):
        for _ in session.steps(5):
            if session.step == 1:
                signal_like_slurmstepd(signal.SIGTERM)
        return {}

    def outer(session):
        for _ in session.steps(STEPS):
            if session.step == 3:
                inner_outcomes.append(run(inner, tmp_path / "inner", CONFIG))
        return {}

    outcome = run(outer, tmp_path / "outer", CONFIG)
    assert [o.status for o in inner_outcomes] == [Status.PREEMPTED]
    assert (outcome.status, outcome.message) == (Status.PREEMPTED, "SIGTERM received: state saved at step 4")


def a_child_runs_its_own_run(run_dir):
    """A process forked by multiprocessing inside a run, whose target is a run of its own: its stop
    signals are its own run's (the shield of a run's children is lifted)."""

    def train(session):
        for _ in session.steps(50):
            if session.step == 2:
                signal_like_slurmstepd(signal.SIGTERM)
        return {}

    raise SystemExit(run(train, run_dir, CONFIG).exit_code)


def test_a_run_in_a_child_of_a_run_hears_its_own_stop_signals(tmp_path):
    codes = []

    def outer(session):
        for _ in session.steps(2):
            child = multiprocessing.get_context("fork").Process(
                target=a_child_runs_its_own_run, args=(tmp_path / f"child{len(codes)}",)
            )
            child.start()
            child.join(60)
            codes.append(child.exitcode)
        return {}

    assert run(outer, tmp_path / "outer", CONFIG).exit_code == ExitCode.FINISHED
    assert codes == [ExitCode.REQUEUE] * 2


def test_a_handler_of_before_run_never_runs_in_a_child_and_the_stop_saves_once(tmp_path):
    """submitit installs its checkpoint-and-requeue handler for SIGUSR2 before the task runs; slurmstepd
    sends USR2 to every process of the step. Only the main process may act on it (the run, once)."""
    marks = tmp_path / "handled-by"

    def door_handler(signum, frame):  # stands for submitit's checkpoint_and_try_requeue
        with marks.open("a") as f:
            f.write(f"{os.getpid()}\n")

    def train(session):
        dataset = TensorDataset(torch.arange(64.0).reshape(32, 2))
        loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)
        model = torch.nn.Linear(2, 1)
        session.register(model=model, data=loader)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            for _ in session.epochs(2):
                for (batch,) in session.batches(loader):
                    if session.step == 3:
                        signal_like_slurmstepd(signal.SIGUSR2)
                    with torch.no_grad():
                        model.weight += batch.mean(0) * pool.map(abs, [-1])[0]
        return {}

    previous = signal.signal(signal.SIGUSR2, door_handler)
    try:
        outcome = run(train, tmp_path / "run", CONFIG)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert outcome.message == "SIGUSR2 received: state saved at step 4", outcome.message
    assert not marks.exists(), f"the door's handler ran in processes {marks.read_text().split()}"
    assert not multiprocessing.active_children()


def helper_process():
    """A process of the program's own that runs until it is signalled (an uploader, a metrics pusher)."""
    while True:
        time.sleep(0.05)


def grandchild_report(report):
    """A shielded child that forks a process of its own: that one is no worker of the run's, and its
    parent's terminate() ends it."""
    grandchild = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    grandchild.start()
    grandchild.terminate()
    grandchild.join(10)
    report.put(grandchild.exitcode)


def test_processes_the_run_started_never_outlive_its_stop_and_their_children_are_not_shielded(tmp_path):
    """A non-daemonic helper dropped the scheduler's signal: the stopped run ends it (else the process's
    exit waits for it until the kill); a process a shielded child forks gets the stop signals unblocked."""
    exit_codes = []

    def action(session, update):
        context = multiprocessing.get_context("fork")
        context.Process(target=helper_process).start()
        report = context.Queue()
        child = context.Process(target=grandchild_report, args=(report,))
        child.start()
        exit_codes.append(report.get(timeout=30))
        child.join(10)
        signal_like_slurmstepd(signal.SIGTERM)

    outcome = run(training(at=3, action=action), tmp_path, CONFIG)
    assert outcome.message == "SIGTERM received: state saved at step 4", outcome.message
    assert exit_codes == [-signal.SIGTERM]
    assert not multiprocessing.active_children()


REQUEUE_ITSELF = """
import sys
from hydra_preempt.outcome import Outcome, Status
from hydra_preempt.slurm.policy import conclude
sys.exit(conclude(Outcome(Status.PREEMPTED, step=7, exit_code=75, run_dir=sys.argv[1], requeue_by="self")))
"""


def test_a_job_that_requeues_itself_records_the_requeue_before_the_requeues_sigterm_ends_it(tmp_path):
    """`scontrol requeue` makes slurmd signal every process of the job, scontrol itself and the job that
    ran it: the fake scontrol does the same (SIGTERM to its process group) before it answers."""
    bin_dir, calls, run_dir = tmp_path / "bin", tmp_path / "calls.txt", tmp_path / "run"
    bin_dir.mkdir()
    run_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nkill -TERM 0\necho answered >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    job = subprocess.run(
        [sys.executable, "-c", REQUEUE_ITSELF, str(run_dir)], env=env, start_new_session=True, capture_output=True
    )
    assert calls.read_text().splitlines() == ["requeue 4242", "answered"], job.stderr.decode()
    assert [(e["event"], e["step"]) for e in read_events(run_dir)] == [("requeue", 7)]
    assert job.returncode == -signal.SIGTERM  # the requeue's SIGTERM, taken once the requeue was recorded
