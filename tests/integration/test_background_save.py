"""Periodic saves written in the background (checkpoint.async_save): what is saved is the state at the
boundary, failures surface at a later boundary as a synchronous one's would, stops wait for the write."""

import json
import os
import signal

import numpy as np
import pytest

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


def training(max_steps, at_step=None):
    """A model and its SGD; after each step, the parameters it ends with are recorded by step;
    `at_step(step, model)` runs at the start of a step, before its update."""
    import torch

    seen: dict[int, list] = {}

    def train(session):
        torch.manual_seed(0)
        model = torch.nn.Linear(256, 256)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        session.register(model=model, optimizer=optimizer)
        session.restore()
        for step in session.steps(max_steps):
            if at_step:
                at_step(step, model)
            model(torch.randn(8, 256)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            seen[step + 1] = [p.detach().clone() for p in model.parameters()]
            session.report(loss=1.0)

    return train, seen


def slow_later_copies(monkeypatch):
    """The copies left for later wait 0.2 s first (a large state on a busy host): the next step's
    update reaches its pre-hook before they are done. Returns how many arrays each such call copied."""
    import time

    from hydra_preempt.checkpoint.tree import HostStaging

    real, counts = HostStaging.copy_later, []

    def slow(self):
        counts.append(len(self._later))
        time.sleep(0.2)
        return real(self)

    monkeypatch.setattr(HostStaging, "copy_later", slow)
    return counts


def saved_parameters(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    return {i.step: list(store.load(i)["objects"]["model"].values()) for i in store.complete()}


def test_parameters_are_copied_while_the_next_step_computes_and_before_its_update(tmp_path, monkeypatch):
    import torch

    counts = slow_later_copies(monkeypatch)
    train, seen = training(30)
    assert run(train, tmp_path, config()).status is Status.FINISHED
    assert counts and all(n == 4 for n in counts), counts  # weight, bias and their momentum buffers
    saved = saved_parameters(tmp_path)
    assert {10, 30} <= saved.keys()  # (a save falling due while a slow disk still writes the last is skipped)
    for step, params in saved.items():  # the update after each boundary waited for its copy
        assert all(torch.equal(torch.as_tensor(s), p) for s, p in zip(params, seen[step])), step


@pytest.mark.parametrize("change", ["weights swapped in and back", "an optimizer not registered"])
def test_parameters_changed_in_place_before_the_next_update_are_not_saved_as_that_steps_state(
    tmp_path, monkeypatch, caplog, change
):
    """After a boundary, while its copy is still pending, the parameters change in place before the
    registered optimizer's update: an evaluation with other weights loaded in place (an EMA swapped
    in, then back), or a second optimizer, not registered, stepping them (an auxiliary objective).
    That checkpoint is not written (the training thread checks the version counters before the
    writer may write: a change in progress during the copy would tear it), the boundary after the
    next saves (or, while the writer is still busy with the dropped one on a loaded machine, a later
    one), and later saves copy at the boundary."""
    import logging

    import torch

    counts = slow_later_copies(monkeypatch)

    def change_at_10(step, model):
        if step != 10:
            return
        if change == "an optimizer not registered":
            model.weight.grad = torch.ones_like(model.weight)
            torch.optim.SGD(model.parameters(), lr=0.01).step()
        else:
            kept = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict({k: torch.zeros_like(v) for k, v in kept.items()})
            model.load_state_dict(kept)

    train, seen = training(30, change_at_10)
    with caplog.at_level(logging.WARNING, logger="hydra_preempt"):
        assert run(train, tmp_path, config()).status is Status.FINISHED
    saved = saved_parameters(tmp_path)
    assert 10 not in saved and 30 in saved and any(10 < step < 30 for step in saved), sorted(saved)
    for step, params in saved.items():
        assert all(torch.equal(torch.as_tensor(s), p) for s, p in zip(params, seen[step])), step
    assert counts == [4]  # from the warning on, nothing is left for later
    assert any("periodic checkpoint of step 10 was not written" in r.message for r in caplog.records)
