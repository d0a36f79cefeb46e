"""Periodic saves written in the background (checkpoint.async_save): what is saved is the state at the
boundary, failures surface at a later boundary as a synchronous one's would, stops wait for the write."""

import json
import os
import signal

import numpy as np

from hydra_preempt import ExitCode, SessionConfig, Status, run
from hydra_preempt.checkpoint.store import CheckpointStore
from hydra_preempt.rundir import read_events


class Blob:
    """A registered object with 32 MB of state, so that a background write takes a while."""

    def __init__(self) -> None:
        self.data = np.zeros(8 << 20, dtype=np.float32)

    def state_dict(self) -> dict:
        return {"data": self.data}

    def load_state_dict(self, state: dict) -> None:
        self.data[:] = state["data"]


def filling(max_steps, on_step=None):
    """After each step the blob holds the number of completed steps, written in place."""

    def train(session):
        blob = Blob()
        session.register(blob=blob)
        session.restore()
        for step in session.steps(max_steps):
            blob.data.fill(step + 1)  # in place, while the previous boundary's save may be being written
            if on_step:
                on_step(session, step)
            session.report(loss=1.0)
        return {"blob": float(blob.data[0])}

    return train


def config(**checkpoint) -> SessionConfig:
    return SessionConfig.from_mapping(
        {
            "checkpoint": {"every_steps": 10, "keep_last": 10, "async_save": True, **checkpoint},
            "divergence": {"enabled": False},
        }
    )


def test_the_checkpoint_holds_the_state_at_the_boundary_though_training_overwrites_it(tmp_path):
    outcome = run(filling(40), tmp_path, config())
    assert outcome.status is Status.FINISHED
    store = CheckpointStore(tmp_path / "checkpoints")
    saved = store.complete()
    assert saved and saved[-1].step == 40
    for info in saved:
        data = store.load(info)["objects"]["blob"]["data"]
        assert (data == info.step).all(), f"step {info.step}: holds {np.unique(data)[:5]}"


def test_a_stop_waits_for_the_write_in_flight_and_resumes_from_it(tmp_path):
    def stop_right_after_a_periodic_save(session, step):
        if step == 10:  # the save of step 10 was staged at the last boundary and may still be written
            os.kill(os.getpid(), signal.SIGTERM)

    first = run(filling(40, stop_right_after_a_periodic_save), tmp_path, config())
    assert (first.status, first.step) == (Status.PREEMPTED, 11)
    assert [i.step for i in CheckpointStore(tmp_path / "checkpoints").complete()] == [10, 11]
    again = run(filling(40), tmp_path, config())
    assert again.status is Status.FINISHED and again.result == {"blob": 40.0}
    assert [e["resumed_from"] for e in read_events(tmp_path) if e["event"] == "stop"][-1] == 11


def test_a_background_write_that_fails_stops_the_run_at_a_later_boundary(tmp_path, tmpfs):
    small = tmpfs("48m")  # one checkpoint of 32 MB fits, a second does not
    outcome = run(filling(40), tmp_path, config(dir=str(small / "ckpt"), keep_last=2))
    assert (outcome.status, outcome.exit_code) == (Status.FAILED, ExitCode.FAILED)
    assert "disk full" in outcome.message and "checkpoint step 10 is intact" in outcome.message
    assert "\n" not in outcome.message
    assert [p.name for p in (small / "ckpt").iterdir() if p.name.startswith(("step-", ".tmp"))] == ["step-000000010"]
    stop = [e for e in read_events(tmp_path) if e["event"] == "stop"][-1]
    assert stop["reason"] == "failed" and stop["exit_code"] == ExitCode.FAILED
    assert json.loads((small / "ckpt" / "step-000000010" / "MANIFEST.json").read_text())["step"] == 10


def test_a_stop_does_not_wait_past_the_kill_for_a_stalled_write(tmp_path, monkeypatch):
    """A background write that hangs (a stalled file system): the stop ends before the kill deadline,
    exit 75, the previous checkpoint standing; nothing else is waited for."""
    import threading
    import time

    from hydra_preempt.session import runner

    release = threading.Event()
    real_save = CheckpointStore.save

    def stalled_at_step_20(self, snapshot, step, *args, **kwargs):
        if step == 20:
            release.wait(60)  # the file system stops answering
        return real_save(self, snapshot, step, *args, **kwargs)

    kill_at = []

    class DeadlineSession(runner.Session):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seconds_left = lambda: kill_at[0] - time.monotonic() if kill_at else None

    def preempt_at_21(session, step):
        if step == 18:  # step 10's write has ended (it settles at the next boundary), so that step 20's is
            # made, not skipped as one in flight; its MANIFEST.json may stand before the writer is done
            deadline = time.monotonic() + 60
            while session.checkpointer.background_flags()[0]:
                assert time.monotonic() < deadline, "step 10's checkpoint was never written"
                time.sleep(0.01)
        if step == 21:
            kill_at.append(time.monotonic() + 4.0)  # SLURM: SIGTERM now, SIGKILL in 4 s
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(CheckpointStore, "save", stalled_at_step_20)
    monkeypatch.setattr(runner, "Session", DeadlineSession)
    try:
        outcome = run(filling(40, preempt_at_21), tmp_path, config())
        ended = time.monotonic()
    finally:
        release.set()
        for thread in threading.enumerate():  # in a real job the process is gone; here, let it end first
            if thread.name == "checkpoint-writer":
                thread.join(60)
    assert (outcome.status, outcome.exit_code) == (Status.PREEMPTED, ExitCode.REQUEUE)
    assert ended < kill_at[0], "the stop waited past the kill"
    assert "the checkpoint of step 10 stands" in outcome.message
    assert read_events(tmp_path)[-1]["checkpoint_step"] == 10
    monkeypatch.undo()
    resumed = run(filling(40), tmp_path, config())
    assert resumed.status is Status.FINISHED and resumed.result == {"blob": 40.0}


def test_the_run_log_names_a_background_checkpoint_that_finished_while_the_run_failed(tmp_path):
    def fail_at_11(session, step):
        if step == 11:
            raise RuntimeError("a bug at step 12")

    outcome = run(filling(40, fail_at_11), tmp_path, config(emergency=False))
    assert outcome.status is Status.FAILED
    assert read_events(tmp_path)[-1]["checkpoint_step"] == 10
