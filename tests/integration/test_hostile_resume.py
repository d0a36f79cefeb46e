"""A resume from a checkpoint whose checksums verify but whose state the session could not have
written: decoded and checked in full before anything is loaded, set aside as corrupt, and the run
resumes from the previous checkpoint, exactly."""

import numpy as np
import pytest

from hydra_preempt import Status, run
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
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(trainer(30), tmp_path_factory.mktemp("reference"), config()).result


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_a_state_the_session_could_not_have_written_falls_back_to_the_previous_checkpoint(tmp_path, reference, edit):
    first = run(trainer(20), tmp_path, config())  # checkpoints at steps 10 and 20
    assert first.status is Status.FINISHED
    store = CheckpointStore(tmp_path / "checkpoints")
    resign_state(store, 20, edit)
    second = run(trainer(30), tmp_path, config())
    assert (second.status, second.result) == (Status.FINISHED, reference)  # resumed exactly, from step 10
    assert corrupt_names(store) == ["000000020"]
    assert sorted(i.reason for i in store.complete() if i.step <= 20) == ["periodic", "periodic"]  # no emergency


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
