"""A resume from a checkpoint whose checksums verify but whose state the session could not have
written: decoded and checked in full before anything is loaded, set aside as corrupt, and the run
resumes from the previous checkpoint, exactly."""

import numpy as np
import pytest

from hydra_preempt import ExitCode, Status, run
from hydra_preempt.checkpoint.store import CheckpointStore
from tests.integration.test_session import config, trainer
from tests.unit.test_hostile_checkpoints import corrupt_names, resign_state


def _rank(p):
    return p["skeleton"]["ranks"][0]


EDITS = {
    "no ranks": lambda p: (p["skeleton"].pop("ranks"), p)[1],
    "no rank at all": lambda p: (p["skeleton"].update(ranks=[]), p)[1],
    "a garbage numpy RNG state": lambda p: (_rank(p)["rng"].update(numpy={"__tuple__": ["MT19937", 5, 0, 0, 0.0]}), p)[
        1
    ],
    "a garbage python RNG state": lambda p: (_rank(p)["rng"].update(python={"__tuple__": [3, [1, 2], None]}), p)[1],
    "no torch RNG state": lambda p: (_rank(p)["rng"].pop("torch_cpu"), p)[1],
    "a step other than the manifest's": lambda p: (p["skeleton"]["session"].update(step=99), p)[1],
    "objects not a mapping": lambda p: (p["skeleton"].update(objects=[1]), p)[1],
    "a NaN in the detector's history": lambda p: (
        p["skeleton"]["session"].update(detector=_detector([float("nan")] * 5)),
        p,
    )[1],
    "strings in the detector's history": lambda p: (p["skeleton"]["session"].update(detector=_detector(["a", "b"])), p)[
        1
    ],
}


def _detector(history):
    return {"history": history, "spikes_in_a_row": 0, "diverged_reason": "", "streak_start": None, "warmup": []}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    watched = {"divergence": {"enabled": True}}
    return run(trainer(30), tmp_path_factory.mktemp("reference"), config(**watched)).result


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_a_state_the_session_could_not_have_written_falls_back_to_the_previous_checkpoint(tmp_path, reference, edit):
    watched = {"divergence": {"enabled": True}}  # so that the detector's saved state is read
    first = run(trainer(20), tmp_path, config(**watched))  # checkpoints at steps 10 and 20
    assert first.status is Status.FINISHED
    store = CheckpointStore(tmp_path / "checkpoints")
    resign_state(store, 20, edit)
    second = run(trainer(30), tmp_path, config(**watched))
    assert (second.status, second.result) == (Status.FINISHED, reference)  # resumed exactly, from step 10
    assert corrupt_names(store) == ["000000020"]
    assert sorted(i.reason for i in store.complete() if i.step <= 20) == ["periodic", "periodic"]  # no emergency


MISMATCHED = {
    "a module state that is a list": lambda p: (p["skeleton"]["objects"].update(model=[1, 2]), p)[1],
    "optimizer param_groups not dicts": lambda p: (p["skeleton"]["objects"]["optimizer"].update(param_groups=[1]), p)[
        1
    ],
    "a data position that is a string": lambda p: (p["skeleton"]["objects"]["data"].update(epoch="abc"), p)[1],
    "a data position beyond the epoch": lambda p: (p["skeleton"]["objects"]["data"].update(index=10**6), p)[1],
}


@pytest.mark.parametrize("edit", MISMATCHED.values(), ids=MISMATCHED.keys())
def test_object_states_that_do_not_fit_are_refused_before_anything_is_loaded(tmp_path, edit):
    assert run(trainer(20), tmp_path, config()).status is Status.FINISHED
    store = CheckpointStore(tmp_path / "checkpoints")
    resign_state(store, 20, edit)
    outcome = run(trainer(30), tmp_path, config())
    assert (outcome.status, outcome.exit_code) == (Status.FAILED, ExitCode.USAGE)
    assert "nothing was loaded" in outcome.message
    assert corrupt_names(store) == [] and [i.step for i in store.complete()] == [10, 20]  # kept, nothing new


def test_a_failure_while_setting_the_objects_writes_no_checkpoint(tmp_path, monkeypatch):
    """A load that fails part way (after every check passed) leaves a half-set state: nothing is saved from it."""
    assert run(trainer(20), tmp_path, config()).status is Status.FINISHED
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    def broken(state):
        raise ValueError("the generator refuses this state")

    monkeypatch.setattr(np.random, "set_state", broken)
    outcome = run(trainer(30), tmp_path, config())
    assert outcome.status is Status.FAILED and "random generators failed (the generator refuses" in outcome.message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_a_symlinked_or_odd_run_lock_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".run.lock").symlink_to(victim)
    outcome = run(trainer(3), run_dir, config())
    assert (outcome.status, outcome.exit_code) == (Status.FAILED, ExitCode.USAGE)
    assert ".run.lock is a symlink" in outcome.message and victim.read_text() == "precious data"
    (run_dir / ".run.lock").unlink()
    (run_dir / ".run.lock").mkdir()
    assert run(trainer(3), run_dir, config()).exit_code == ExitCode.USAGE


def test_run_logs_in_the_run_directory_are_never_written_through_links_or_into_fifos(tmp_path, caplog):
    import os

    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to(victim)
    (run_dir / "run_log.jsonl").symlink_to(victim)
    outcome = run(trainer(3), run_dir, config())
    assert outcome.status is Status.FINISHED and victim.read_text() == "precious data"
    assert "metrics.jsonl is a symlink" in caplog.text and "run_log.jsonl is a symlink" in caplog.text
    for name in ("metrics.jsonl", "run_log.jsonl"):
        (run_dir / name).unlink()
        os.mkfifo(run_dir / name)  # nobody reads it: a blocking open would hang the run for ever
    assert run(trainer(6), run_dir, config()).status is Status.FINISHED
