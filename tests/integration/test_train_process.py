"""train.py as a real process, stopped by real signals at random steps, SIGKILLed during saves."""

import itertools
import random
import signal
import time

import pytest

from hydra_preempt.outcome import ExitCode
from hydra_preempt.rundir import read_events
from tools.train_process import TrainProcess

pytestmark = pytest.mark.slow

STEPS = 240
BASE = [f"trainer.max_steps={STEPS}", "trainer.log_every=1", "checkpoint.every_steps=50", "trainer.step_sleep=0.002"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    proc = TrainProcess(tmp_path_factory.mktemp("reference"), BASE)
    assert proc.run() == ExitCode.FINISHED, proc.output
    return proc.result()


def preempt_chain(run_dir, overrides, sig, stop_steps):
    """Start train.py, send `sig` after each step in `stop_steps`, restart, finish; return the last process."""
    for target in [*stop_steps, None]:
        proc = TrainProcess(run_dir, overrides).start()
        if target is not None:
            proc.wait_for_step(target)
            proc.send(sig)
        rc = proc.wait()
        expected = ExitCode.FINISHED if target is None else ExitCode.REQUEUE
        assert rc == expected, f"signal after step {target}: exit {rc}\n{proc.output}"
    return proc


@pytest.mark.parametrize("preempt_signal", ["TERM", "USR2"])
def test_preempted_at_random_steps_ends_bit_identical(tmp_path, reference, preempt_signal):
    stop_steps = sorted(random.Random().sample(range(5, STEPS - 20), 3))
    sig = signal.Signals[f"SIG{preempt_signal}"]
    last = preempt_chain(tmp_path, [*BASE, f"signals.preempt={preempt_signal}"], sig, stop_steps)
    result = last.result()
    assert result["params_sha256"] == reference["params_sha256"], f"signals after steps {stop_steps}"
    assert result["step"] == STEPS and result["restarts"] == 3
    stops = [e for e in read_events(tmp_path) if e["event"] == "stop"]
    assert [s["reason"] for s in stops] == ["preempted"] * 3 + ["finished"]
    # each start resumed exactly where the previous one stopped: no step lost, none repeated
    for before, after in zip(stops, stops[1:]):
        assert after["resumed_from"] == before["step"] == before["checkpoint_step"]
    # the stop happened at the first boundary after the signal, give or take the output pipe's lag
    for target, stop in zip(stop_steps, stops):
        assert target <= stop["step"] <= target + 10


def test_sigusr1_checkpoints_and_training_goes_on(tmp_path, reference):
    proc = TrainProcess(tmp_path, [*BASE, "checkpoint.keep_last=10"]).start()
    proc.wait_for_step(77)
    proc.send(signal.SIGUSR1)
    assert proc.wait() == ExitCode.FINISHED
    assert proc.result()["params_sha256"] == reference["params_sha256"]
    manual = [
        p
        for p in (tmp_path / "checkpoints").glob("step-*")
        if '"reason": "manual"' in (p / "MANIFEST.json").read_text()
    ]
    assert len(manual) == 1


def test_sigint_saves_and_exits_cancelled(tmp_path):
    proc = TrainProcess(tmp_path, BASE).start()
    proc.wait_for_step(30)
    proc.send(signal.SIGINT)
    assert proc.wait() == ExitCode.CANCELLED
    stop = read_events(tmp_path)[-1]
    assert stop["reason"] == "cancelled" and stop["checkpoint_step"] == stop["step"]
    assert "Traceback" not in proc.output


def test_sigkill_during_saves_never_leaves_an_unloadable_latest(tmp_path):
    """16 SIGKILLs at random moments of a run that saves a 14 MB state at every step (more: `make
    flaky-check`, which runs it again and again).

    Starts take turns between background saves and saves at the boundary, so
    kills land in both. Every next start must load a complete checkpoint
    (never a partial one) and go on; the final result must equal an
    uninterrupted run's.
    """
    overrides = [
        "trainer.max_steps=400",
        "trainer.log_every=1",
        "model.hidden=768",
        "model.depth=3",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        "checkpoint.keep_best=0",
    ]
    # The uninterrupted run meanwhile, saving only at its end (the result does not depend on saves)
    reference_dir = tmp_path.parent / f"{tmp_path.name}-reference"
    saves_at_the_end = [o.replace("every_steps=1", "every_steps=400") for o in overrides]
    reference = TrainProcess(reference_dir, saves_at_the_end).start()
    rng = random.Random()
    resumed = []
    interrupted_saves = 0
    trials = 0
    for attempt in range(16):
        mode = f"checkpoint.async_save={'true' if attempt % 2 else 'false'}"
        proc = TrainProcess(tmp_path, [*overrides, mode]).start()
        start = proc.wait_for_line(r"starting at step (\d+)")
        resumed.append(int(start[1]))
        assert "unusable" not in proc.output and "Traceback" not in proc.output, proc.output
        interrupted_saves += proc.output.count("left by an interrupted save")
        if resumed[-1] == 400:
            break
        proc.wait_for_step(resumed[-1] + 1)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send(signal.SIGKILL)
        assert proc.wait() in (-signal.SIGKILL, ExitCode.FINISHED)
        trials += 1
    assert trials >= 12, "the run finished before enough kills: make it longer"
    assert resumed == sorted(resumed), f"a start went back in steps: {resumed}"
    assert interrupted_saves >= 3, (
        f"only {interrupted_saves} of {trials} kills hit a save: the test is not testing saves"
    )

    final = TrainProcess(tmp_path, overrides)
    assert final.run() == ExitCode.FINISHED, final.output
    assert reference.wait() == ExitCode.FINISHED, reference.output
    assert final.result()["params_sha256"] == reference.result()["params_sha256"]


# -- bad input: a clear message, the right exit code, nothing lost ---------------------------


def test_unknown_key_is_refused_by_hydra_without_traceback(tmp_path):
    proc = TrainProcess(tmp_path, ["trainer.max_stepz=5"])
    rc = proc.run()
    assert rc != 0 and "max_stepz" in proc.output and "Traceback" not in proc.output


def test_invalid_session_value_exits_2_with_the_key_named(tmp_path):
    proc = TrainProcess(tmp_path, ["checkpoint.keep_last=0"])
    assert proc.run() == ExitCode.USAGE
    assert "checkpoint.keep_last must be an integer >= 1" in proc.output and "Traceback" not in proc.output


@pytest.mark.parametrize(
    ("run_dir", "overrides", "message"),
    [
        ("run", ["+chekpoint.every_steps=5"], "invalid configuration: unknown section(s) chekpoint; known: checkpoint"),
        (
            "run",
            ["trainer.max_steps=abc"],
            "invalid configuration: trainer.max_steps must be a positive integer below 2**62, got 'abc'",
        ),
        ("a-file/run", [], "Error in hydra.run.dir: run directory {tmp}/a-file/run is not usable: Not a directory"),
        (
            "run",
            ["hydra.mode=MULTIRUN", "hydra.sweep.dir={tmp}/a-file/sweep"],
            "run directory {tmp}/a-file/sweep is not usable",
        ),
    ],
    ids=["unknown-section", "train-key", "run-dir", "sweep-dir"],
)
def test_bad_configuration_exits_2_before_the_run_starts(tmp_path, run_dir, overrides, message):
    """One line naming the key or directory, exit 2, and no run started: no run log, no checkpoint."""
    (tmp_path / "a-file").write_text("")
    proc = TrainProcess(tmp_path / run_dir, [o.format(tmp=tmp_path) for o in ["trainer.max_steps=2", *overrides]])
    assert proc.run() == ExitCode.USAGE, proc.output
    assert message.format(tmp=tmp_path) in proc.output and "Traceback" not in proc.output
    assert not list(tmp_path.glob("**/run_log.jsonl")) and not list(tmp_path.glob("**/checkpoints"))


def test_unusable_checkpoint_directory_exits_2(tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = TrainProcess(tmp_path / "run", [f"checkpoint.dir={tmp_path / 'a-file' / 'ckpt'}", "trainer.max_steps=5"])
    assert proc.run() == ExitCode.USAGE
    assert "is not usable: Not a directory" in proc.output and "Traceback" not in proc.output


def test_other_model_in_the_run_directory_exits_2_naming_keys(tmp_path):
    assert TrainProcess(tmp_path, ["trainer.max_steps=60"]).run() == ExitCode.FINISHED
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    proc = TrainProcess(tmp_path, ["trainer.max_steps=120", "model.hidden=32"])
    assert proc.run() == ExitCode.USAGE
    assert "model.0.weight: shape (64, 16) in the checkpoint, (32, 16) in this model" in proc.output
    assert "Traceback" not in proc.output
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_corrupt_newest_checkpoint_falls_back_and_still_ends_identical(tmp_path, reference):
    proc = TrainProcess(tmp_path, BASE).start()
    proc.wait_for_step(160)
    proc.send(signal.SIGTERM)
    assert proc.wait() == ExitCode.REQUEUE
    newest = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    with open(newest / "tensors.bin", "r+b") as f:
        f.truncate(10)
    again = TrainProcess(tmp_path, BASE)
    assert again.run() == ExitCode.FINISHED
    assert f"checkpoint {newest.name} is unusable" in again.output
    assert again.result()["params_sha256"] == reference["params_sha256"]


def test_disk_full_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, tmpfs):
    small = tmpfs("3m")
    # ~1.9 MB per checkpoint: the first fits, the second does not (the old one goes only after the new one is complete)
    overrides = [
        "trainer.max_steps=100",
        "model.hidden=384",
        f"checkpoint.dir={small / 'ckpt'}",
        "checkpoint.every_steps=20",
    ]
    proc = TrainProcess(tmp_path, overrides)
    assert proc.run() == ExitCode.FAILED
    assert "disk full" in proc.output and "checkpoint step 20 is intact" in proc.output
    assert "Traceback" not in proc.output
    assert [p.name for p in (small / "ckpt").iterdir() if p.name.startswith("step-")] == ["step-000000020"]


SLOW = [*BASE, "trainer.step_sleep=0.04"]  # the first run lasts long enough for the second to start


def test_a_second_process_on_the_same_run_waits_then_resumes(tmp_path, reference):
    """A duplicate job (an interrupted workflow started again) must not train beside the first one."""
    first = TrainProcess(tmp_path, SLOW).start()
    first.wait_for_step(20)
    second = TrainProcess(tmp_path, SLOW).start()
    second.wait_for_line("is in use by .* pid")
    assert second.last_step == 0  # it waits, it does not train
    assert first.wait() == ExitCode.FINISHED, first.output
    assert second.wait() == ExitCode.FINISHED, second.output
    assert second.result()["params_sha256"] == reference["params_sha256"]
    stops = [e for e in read_events(tmp_path) if e["event"] == "stop"]
    assert [(s["pid"], s["reason"]) for s in stops] == [(first._proc.pid, "finished"), (second._proc.pid, "finished")]
    assert stops[1]["resumed_from"] == STEPS  # nothing trained twice


def test_a_waiting_duplicate_stopped_by_a_signal_leaves_the_run_alone(tmp_path):
    first = TrainProcess(tmp_path, SLOW).start()
    first.wait_for_step(20)
    second = TrainProcess(tmp_path, SLOW).start()
    second.wait_for_line("is in use by")
    second.send(signal.SIGTERM)
    assert second.wait() == ExitCode.REQUEUE, second.output
    assert first.wait() == ExitCode.FINISHED, first.output
    assert {e["pid"] for e in read_events(tmp_path)} == {first._proc.pid}


def test_a_learning_rate_that_explodes_at_once_leaves_no_diverged_checkpoint_as_the_newest(tmp_path):
    # lr=1e4: the loss is 3e28 at step 2 (inside min_history: taken unjudged), then inf and nan
    proc = TrainProcess(tmp_path, ["optim.lr=1e4", "trainer.max_steps=20", "checkpoint.every_steps=1"])
    assert proc.run() == ExitCode.DIVERGED, proc.output
    checkpoints = tmp_path / "checkpoints"
    assert not list(checkpoints.glob("step-*")) and list(checkpoints.glob("diverged-step-*"))
    assert "a restart starts at step 0 (no healthy checkpoint)" in proc.output


def test_stop_signals_after_the_run_finished_leave_exit_code_0(tmp_path):
    """From the moment result.json appears until the process is gone, a stop signal every 2 ms:
    the finished run must still exit 0 (a late SIGTERM used to turn it into a kill, -15)."""
    storm = itertools.cycle([signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2])
    for attempt in range(2):
        run_dir = tmp_path / str(attempt)
        proc = TrainProcess(run_dir, ["trainer.max_steps=20", "checkpoint.every_steps=10"]).start()
        assert proc._proc is not None
        while not (run_dir / "result.json").exists():
            assert proc._proc.poll() is None, proc.output
            time.sleep(0.001)
        sent = 0
        while proc._proc.poll() is None:
            proc.send(next(storm))
            sent += 1
            time.sleep(0.002)
        assert proc.wait() == ExitCode.FINISHED, f"{sent} signals\n{proc.output}"
        assert sent >= 4, "the process ended before the signals: the test did not test them"
        assert proc.result()["step"] == 20
        assert read_events(run_dir)[-1]["reason"] == "finished"
