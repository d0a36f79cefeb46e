"""The session in-process, with real signals sent to this process at chosen points of a step."""

import hashlib
import json
import logging
import math
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from hydra_preempt import ExitCode, ResumableLoader, SessionConfig, Status, run
from hydra_preempt.checkpoint.store import CheckpointStore
from hydra_preempt.errors import ConfigError
from hydra_preempt.rundir import read_events

ASYNC_SAVE = True  # set for each test by the fixture below: every test here runs with background saves on and off


@pytest.fixture(autouse=True, params=[True, False], ids=["async", "sync"])
def async_save(request, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ASYNC_SAVE", request.param)
    return request.param


def config(**sections) -> SessionConfig:
    base = {
        "checkpoint": {"every_steps": 10, "keep_last": 3, "async_save": ASYNC_SAVE},
        "divergence": {"enabled": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return SessionConfig.from_mapping(base)


def digest(model) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainer(max_steps, hook=None, width=8):
    """A real small training loop; hook(step, phase) may send signals or raise."""

    def train(session):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(256, 4, generator=gen)
        data = ResumableLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16, seed=2)
        model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Dropout(0.3), torch.nn.Linear(width, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.9)
        session.register(model=model, optimizer=optimizer, scheduler=scheduler, data=data)
        session.restore()
        for step in session.steps(max_steps):
            hook and hook(step, "start")
            xb, yb = next(data)
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            hook and hook(step, "forward")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            hook and hook(step, "updated")
            session.report(loss=loss.item())
        return digest(model)

    return train


def kill_self_at(target_step, sig, phase="start", times=1):
    def hook(step, at):
        if step == target_step and at == phase:
            for _ in range(times):
                os.kill(os.getpid(), sig)

    return hook


def saves(run_dir):
    return [json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints").glob("step-*/MANIFEST.json"))]


@pytest.fixture
def reference(tmp_path_factory):
    outcome = run(trainer(40), tmp_path_factory.mktemp("reference"), config())
    assert outcome.status is Status.FINISHED
    return outcome.result


@pytest.mark.parametrize("stop_at", [0, 13, 20, 39])
def test_sigterm_saves_exits_for_requeue_and_resumes_exactly(tmp_path, reference, stop_at):
    first = run(trainer(40, kill_self_at(stop_at, signal.SIGTERM)), tmp_path, config())
    assert (first.status, first.exit_code, first.step) == (Status.PREEMPTED, ExitCode.REQUEUE, stop_at + 1)
    assert saves(tmp_path)[-1]["step"] == stop_at + 1
    assert saves(tmp_path)[-1]["reason"] in ("preempt", "periodic")
    second = run(trainer(40), tmp_path, config())
    assert second.status is Status.FINISHED
    assert second.result == reference
    stops = [e for e in read_events(tmp_path) if e["event"] == "stop"]
    assert [s["reason"] for s in stops] == ["preempted", "finished"]
    assert stops[1]["resumed_from"] == stop_at + 1


def test_repeated_signals_make_one_save(tmp_path):
    outcome = run(trainer(40, kill_self_at(13, signal.SIGTERM, times=5)), tmp_path, config())
    assert outcome.status is Status.PREEMPTED
    assert [(s["step"], s["reason"]) for s in saves(tmp_path)] == [(10, "periodic"), (14, "preempt")]


def test_sigusr1_saves_and_keeps_training(tmp_path, reference, async_save):
    outcome = run(
        trainer(40, kill_self_at(14, signal.SIGUSR1, phase="forward")), tmp_path, config(checkpoint={"keep_last": 10})
    )
    assert outcome.status is Status.FINISHED and outcome.result == reference
    saved = [(s["step"], s["reason"]) for s in saves(tmp_path)]
    every = [(10, "periodic"), (15, "manual"), (20, "periodic"), (30, "periodic"), (40, "periodic")]
    if async_save:  # a periodic save due while the previous one is still being written is skipped
        assert saved[:2] == every[:2] and set(saved[2:-1]) <= set(every[2:]) and saved[-1][0] == 40
    else:
        assert saved == every


def test_sigint_saves_and_cancels_without_requeue(tmp_path):
    outcome = run(trainer(40, kill_self_at(5, signal.SIGINT, phase="updated")), tmp_path, config())
    assert (outcome.status, outcome.exit_code, outcome.step) == (Status.CANCELLED, ExitCode.CANCELLED, 6)
    assert saves(tmp_path)[-1]["step"] == 6


def test_configured_usr2_preempts_and_term_still_does(tmp_path):
    usr2 = run(trainer(40, kill_self_at(3, signal.SIGUSR2)), tmp_path / "a", config(signals={"preempt": "USR2"}))
    assert usr2.status is Status.PREEMPTED and usr2.step == 4
    term = run(trainer(40, kill_self_at(3, signal.SIGTERM)), tmp_path / "b", config(signals={"preempt": "usr2"}))
    assert term.status is Status.PREEMPTED


class SignalDuringSave:
    """A registered object whose state_dict() (called during a save) sends a signal to this process."""

    def __init__(self, sig, at_save_number):
        self.sig, self.at, self.calls = sig, at_save_number, 0

    def state_dict(self):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return {"calls": self.calls}

    def load_state_dict(self, state):
        pass


def with_object(train, **objects):
    def wrapped(session):
        session.register(**objects)
        return train(session)

    return wrapped


def test_checkpoint_signal_during_a_save_starts_no_other_save(tmp_path):
    # emergency capture also calls state_dict() at each step start; disable it to count saves only
    probe = SignalDuringSave(signal.SIGUSR1, at_save_number=1)
    # which periodic saves happen must not depend on how fast a background write is: sync
    outcome = run(
        with_object(trainer(25), probe=probe), tmp_path, config(checkpoint={"emergency": False, "async_save": False})
    )
    assert outcome.status is Status.FINISHED
    assert [(s["step"], s["reason"]) for s in saves(tmp_path)] == [(10, "periodic"), (20, "periodic"), (25, "final")]


def test_preempt_signal_during_a_periodic_save_stops_without_a_second_save(tmp_path):
    probe = SignalDuringSave(signal.SIGTERM, at_save_number=2)
    outcome = run(
        with_object(trainer(40), probe=probe), tmp_path, config(checkpoint={"emergency": False, "async_save": False})
    )
    assert (outcome.status, outcome.step) == (Status.PREEMPTED, 20)
    assert [(s["step"], s["reason"]) for s in saves(tmp_path)] == [(10, "periodic"), (20, "periodic")]


def fail_at(target_step, phase):
    def hook(step, at):
        if step == target_step and at == phase:
            raise RuntimeError("boom: bad batch")

    return hook


def test_exception_before_the_update_writes_an_emergency_checkpoint_that_resumes_exactly(tmp_path, reference):
    outcome = run(trainer(40, fail_at(16, "forward")), tmp_path, config())
    assert (outcome.status, outcome.exit_code) == (Status.FAILED, ExitCode.FAILED)
    assert "boom" in outcome.message and "emergency checkpoint at step 16" in outcome.message
    assert (saves(tmp_path)[-1]["step"], saves(tmp_path)[-1]["reason"]) == (16, "emergency")
    assert run(trainer(40), tmp_path, config()).result == reference


def test_exception_after_the_update_writes_no_emergency_checkpoint(tmp_path, caplog, reference):
    with caplog.at_level(logging.ERROR, logger="hydra_preempt"):
        outcome = run(trainer(40, fail_at(16, "updated")), tmp_path, config())
    assert outcome.status is Status.FAILED and "emergency" not in outcome.message
    assert "no emergency checkpoint" in caplog.text
    assert saves(tmp_path)[-1]["step"] == 10
    assert run(trainer(40), tmp_path, config()).result == reference


class Frames:
    """A replay buffer's frames: a NumPy array, no version counter, more than 2 ms to copy a step."""

    def __init__(self):
        self.frames = np.zeros(2**23, dtype=np.float32)  # 32 MB, its pages never touched: no memory

    def state_dict(self):
        return {"frames": self.frames}

    def load_state_dict(self, state):
        self.frames = state["frames"]


def test_exception_before_the_update_with_an_object_too_costly_to_copy_writes_no_emergency_checkpoint(
    tmp_path, caplog, reference
):
    with caplog.at_level(logging.WARNING, logger="hydra_preempt"):
        outcome = run(with_object(trainer(40, fail_at(16, "forward")), frames=Frames()), tmp_path, config())
    assert outcome.status is Status.FAILED and saves(tmp_path)[-1]["step"] == 10
    assert "'frames' too large to copy at each step start: its state when step 17 began is unknown" in caplog.text
    assert caplog.text.count("holds values without version counters") == 1
    assert run(with_object(trainer(40), frames=Frames()), tmp_path, config()).result == reference


def test_checkpoint_of_another_model_is_refused_naming_keys_and_nothing_lost(tmp_path):
    run(trainer(10), tmp_path, config())
    before = saves(tmp_path)
    outcome = run(trainer(20, width=16), tmp_path, config())
    assert (outcome.status, outcome.exit_code) == (Status.FAILED, ExitCode.USAGE)
    assert "model.0.weight: shape (8, 4) in the checkpoint, (16, 4) in this model" in outcome.message
    assert saves(tmp_path) == before

    def other_objects(session):
        session.register(model=torch.nn.Linear(2, 2))
        session.restore()

    outcome = run(other_objects, tmp_path, config())
    assert outcome.exit_code == ExitCode.USAGE
    assert "only in the checkpoint: ['data', 'optimizer', 'scheduler']" in outcome.message


def test_checkpoint_of_another_dtype_is_refused_unless_a_cast_is_asked_for(tmp_path):
    def linear(dtype):
        def train(session):
            model = torch.nn.Linear(2, 2).to(dtype)
            session.register(model=model)
            for _ in session.steps(2):
                pass
            return {"weight": model.weight.tolist()}

        return train

    saved = run(linear(torch.float32), tmp_path, config()).result
    outcome = run(linear(torch.float64), tmp_path, config())
    assert outcome.exit_code == ExitCode.USAGE
    assert "model.weight (torch.float32 in the checkpoint, torch.float64 in this model)" in outcome.message
    cast = run(linear(torch.float64), tmp_path, config(checkpoint={"cast_dtype": True}))
    assert cast.exit_code == ExitCode.FINISHED and cast.result == saved  # float32 values, exactly, as float64


def test_unwritable_run_directory_is_a_clear_usage_error(tmp_path):
    (tmp_path / "file").write_text("")
    outcome = run(trainer(5), tmp_path / "file" / "run", config())
    assert outcome.exit_code == ExitCode.USAGE and "not usable: Not a directory" in outcome.message


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"checkpoint": {"evry_steps": 5}}, "unknown key.*checkpoint.evry_steps"),
        ({"checkpoint": {"every_steps": "5"}}, "checkpoint.every_steps must be null or int"),
        ({"checkpoint": {"every_steps": 0}}, "checkpoint.every_steps must be > 0"),
        ({"checkpoint": {"keep_best": 1}}, "checkpoint.metric"),
        ({"signals": {"preempt": "INT"}}, "signals.preempt must be one of"),
        ({"divergence": {"factor": 0.5}}, "divergence.factor"),
    ],
)
def test_invalid_session_config_is_refused(mapping, message):
    with pytest.raises(ConfigError, match=message):
        SessionConfig.from_mapping(mapping)


def test_run_log_counts_restarts(tmp_path):
    run(trainer(20, kill_self_at(4, signal.SIGTERM)), tmp_path, config())
    run(trainer(20, kill_self_at(9, signal.SIGTERM)), tmp_path, config())

    def count(session):
        trainer(20)(session)
        return session.restarts

    assert run(count, tmp_path, config()).result == 2
    stops = [e for e in read_events(tmp_path) if e["event"] == "stop"]
    assert [(s["resumed_from"], s["step"], s["reason"]) for s in stops] == [
        (None, 5, "preempted"),
        (5, 10, "preempted"),
        (10, 20, "finished"),
    ]
    assert all(s["signal_to_saved_s"] is not None for s in stops[:2])


# -- divergence: the two scenarios -------------------------------------------------


def scripted_loss(losses, evaluate_every=None, watch=None):
    """A training loop whose reported loss follows a script; watch(step) runs after each step."""

    def train(session):
        model = torch.nn.Linear(2, 1)
        session.register(model=model)
        session.restore()
        for step in session.steps(len(losses)):
            with torch.no_grad():
                model.weight.add_(0.01)  # a real update
            number = step + 1
            if evaluate_every is None or number % evaluate_every == 0:
                session.report(loss=losses[step])
            watch and watch(session, number)

    return train


def on_disk(run_dir):
    return CheckpointStore(run_dir / "checkpoints").complete()


def test_basic_scenario_never_more_than_five_and_best_sorted(tmp_path):
    losses = [4.0 - 0.02 * i + (0.3 if i % 7 == 0 else 0.0) for i in range(100)]
    counts = []
    cfg = config(
        checkpoint={"every_steps": 25, "keep_last": 3, "keep_best": 2, "metric": "loss"},
        divergence={"enabled": True, "window": 10, "factor": 2.0, "patience": 3},
    )
    outcome = run(
        scripted_loss(losses, evaluate_every=25, watch=lambda s, n: counts.append(len(on_disk(tmp_path)))),
        tmp_path,
        cfg,
    )
    assert outcome.status is Status.FINISHED
    assert max(counts) <= 5
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    best = [b["loss"] for b in index["best"]]
    assert best == sorted(best) and len(best) == 2
    assert {b["step"] for b in index["best"]} <= {i.step for i in on_disk(tmp_path)}


def test_basic_scenario_with_frequent_saves_stays_within_k_plus_n(tmp_path):
    gen = torch.Generator().manual_seed(0)
    # U-shaped, like a run that starts to overfit: the best checkpoints become old ones
    losses = (1.0 + ((torch.arange(100) - 40.0) / 60.0) ** 2 + 0.05 * torch.rand(100, generator=gen)).tolist()
    counts = []
    cfg = config(
        # every periodic save written (in the background a save due while one is in flight is skipped)
        checkpoint={"every_steps": 5, "keep_last": 3, "keep_best": 2, "metric": "loss", "async_save": False},
        divergence={"enabled": True},
    )
    run(scripted_loss(losses, watch=lambda s, n: counts.append(len(on_disk(tmp_path)))), tmp_path, cfg)
    assert max(counts) == 5  # reached, never exceeded
    kept = {i.step: i.metrics["loss"] for i in on_disk(tmp_path)}
    saved_losses = {n: losses[n - 1] for n in range(5, 101, 5)}
    two_best = sorted(saved_losses, key=saved_losses.get)[:2]
    assert set(two_best) <= set(kept)


def test_spike_scenario_stops_before_good_checkpoints_are_lost(tmp_path):
    losses = [4.0 - 1.2 * i / 73 for i in range(74)] + [8.0] * 76  # falls to 2.8 at step 74; 8.0 from step 75
    cfg = config(
        checkpoint={"every_steps": 25, "keep_last": 3, "keep_best": 2, "metric": "loss", "async_save": False},
        divergence={"enabled": True, "window": 20, "factor": 2.0, "patience": 5},
    )
    outcome = run(scripted_loss(losses), tmp_path, cfg)
    assert (outcome.status, outcome.exit_code) == (Status.DIVERGED, ExitCode.DIVERGED)
    assert outcome.step <= 125
    assert "diverged" in outcome.message
    kept = on_disk(tmp_path)
    assert [i.step for i in kept] == [25, 50]  # nothing saved during the spike
    assert all(i.metrics["loss"] < 4.0 for i in kept)
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert [b["step"] for b in index["best"]] == [50, 25]
    stop = [e for e in read_events(tmp_path) if e["event"] == "stop"][-1]
    assert stop["reason"] == "diverged" and stop["exit_code"] == 3


# -- divergence: what a diverged run leaves as its newest checkpoint ----------------


def steps_of(run_dir, prefix):
    """Steps of the checkpoint directories named PREFIX-step-NNNNNNNNN[...]."""
    return sorted(int(p.name.split("step-")[1][:9]) for p in (run_dir / "checkpoints").glob(f"{prefix}step-*"))


def stop_event(run_dir):
    return [e for e in read_events(run_dir) if e["event"] == "stop"][-1]


def test_a_loss_exploding_during_warm_up_leaves_a_healthy_newest_checkpoint(tmp_path, async_save):
    nan = float("nan")
    losses = [1.0, 0.9, 0.8, 3e28, 5e28, nan, nan, nan]  # 3e28 and 5e28 come before min_history: taken unjudged
    cfg = config(
        checkpoint={"every_steps": 1, "keep_last": 10, "keep_best": 2, "metric": "loss"},
        divergence={"enabled": True, "window": 10, "factor": 2.0, "patience": 3, "min_history": 5},
    )
    # a short pause per step lets most background writes end before the next boundary
    outcome = run(scripted_loss(losses, watch=lambda s, n: time.sleep(0.05)), tmp_path, cfg)
    assert (outcome.status, outcome.exit_code, outcome.step) == (Status.DIVERGED, ExitCode.DIVERGED, 8)
    # step 3's state produced the 3e28 of step 4: it and everything after are set aside, none deleted
    kept, aside = [i.step for i in on_disk(tmp_path)], steps_of(tmp_path, "diverged-")
    if async_save:  # a periodic save due while one is in flight is skipped
        assert kept and max(kept) <= 2 and set(aside) <= {3, 4, 5}
    else:
        assert (kept, aside) == ([1, 2], [3, 4, 5])
    newest = on_disk(tmp_path)[-1]
    assert math.isfinite(newest.metrics["loss"]) and newest.metrics["loss"] <= 1.0
    assert f"a restart resumes from step {newest.step}" in outcome.message and "\n" not in outcome.message
    index = json.loads((tmp_path / "checkpoints" / "index.json").read_text())
    assert index["latest"] == newest.step and {b["step"] for b in index["best"]} == set(kept)
    assert stop_event(tmp_path)["checkpoint_step"] == newest.step
    again = run(scripted_loss([1.0, 0.9, 0.8, 0.7, 0.6]), tmp_path, cfg)
    assert again.status is Status.FINISHED and stop_event(tmp_path)["resumed_from"] == newest.step


def test_a_save_in_flight_when_divergence_fires_is_waited_for_and_set_aside(tmp_path, monkeypatch):
    slow_save = CheckpointStore.save

    def save(self, *args, **kwargs):
        time.sleep(0.3)  # the write of step 4 is still going on when step 5 diverges
        return slow_save(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointStore, "save", save)
    cfg = config(
        checkpoint={"every_steps": 2, "keep_last": 10},
        divergence={"enabled": True, "window": 10, "factor": 2.0, "patience": 1, "min_history": 3},
    )
    pause_in_3 = lambda s, n: n == 3 and time.sleep(0.5)  # noqa: E731 (the save of step 2 ends meanwhile)
    outcome = run(scripted_loss([1.0, 0.9, 0.8, 0.7, 50.0], watch=pause_in_3), tmp_path, cfg)
    assert (outcome.status, outcome.step) == (Status.DIVERGED, 5)
    assert [i.step for i in on_disk(tmp_path)] == [2] and steps_of(tmp_path, "diverged-") == [4]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert "a restart resumes from step 2" in outcome.message


def test_a_stop_signal_at_a_nan_loss_saves_nothing_and_stops_as_diverged(tmp_path, caplog):
    nan = float("nan")
    losses = [1.0, 0.9, 0.8, 0.7, 0.6, nan, nan, nan, nan, nan]
    term_after_8 = lambda s, n: n == 8 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="hydra_preempt"):
        outcome = run(scripted_loss(losses, watch=term_after_8), tmp_path, config(checkpoint={"every_steps": 3}))
    assert (outcome.status, outcome.exit_code, outcome.step) == (Status.DIVERGED, ExitCode.DIVERGED, 8)
    assert "SIGTERM received with loss=nan at step 8" in outcome.message
    assert "a restart resumes from step 3" in outcome.message
    assert [i.step for i in on_disk(tmp_path)] == [3]  # 6 and 9: nan, not saved; nothing saved for the stop
    assert "loss=nan at step 6: not saving this state" in caplog.text


def test_a_run_that_ends_at_a_nan_loss_saves_no_final_checkpoint(tmp_path, async_save):
    nan = float("nan")
    outcome = run(scripted_loss([1.0, 0.9, 0.8, 0.7, nan]), tmp_path, config(checkpoint={"every_steps": 2}))
    assert (outcome.status, outcome.exit_code) == (Status.DIVERGED, ExitCode.DIVERGED)
    assert "training ended with loss=nan at step 5" in outcome.message
    # step 4's state produced the nan of step 5: set aside (in the background it may have been skipped)
    assert [i.step for i in on_disk(tmp_path)] == [2] and steps_of(tmp_path, "diverged-") in (
        [4],
        [] if async_save else [4],
    )
    assert "a restart resumes from step 2" in outcome.message
