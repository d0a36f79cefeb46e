"""Whether a step has changed the registered state yet (it decides whether an emergency checkpoint is consistent).

The fingerprint no longer walks every tensor: optimizer steps are counted by a hook, and
only what may change outside an optimizer is watched. Each way a step can change state is here.
"""

import logging

import numpy as np
import pytest
import torch

from hydra_preempt.session.state import COPY_LIMIT_NS, StateRegistry, copy_cost_ns


def registry(**objects):
    r = StateRegistry()
    r.register(False, **objects)
    return r


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def test_forward_and_backward_in_eval_mode_change_nothing_an_optimizer_step_does():
    model, optimizer = model_and_optimizer()
    r = registry(model=model, optimizer=optimizer)
    model.eval()
    start = r.step_start(0)
    model(torch.randn(8, 4)).sum().backward()
    assert r.unchanged_since(start)
    optimizer.step()
    assert not r.unchanged_since(start)


def test_a_failed_optimizer_step_counts_as_a_change():
    model, optimizer = model_and_optimizer()
    r = registry(model=model, optimizer=optimizer)
    start = r.step_start(0)

    def fail(*_):
        raise RuntimeError("inside step()")

    optimizer.register_step_pre_hook(fail)
    with pytest.raises(RuntimeError):
        optimizer.step()
    assert not r.unchanged_since(start)


def test_batch_norm_statistics_updated_in_forward_are_a_change():
    model, optimizer = model_and_optimizer()
    r = registry(model=model, optimizer=optimizer)
    start = r.step_start(0)
    model.train()
    model(torch.randn(8, 4))
    assert not r.unchanged_since(start)


def test_parameters_updated_by_hand_without_a_registered_optimizer_are_a_change():
    model, _ = model_and_optimizer()
    r = registry(model=model)
    start = r.step_start(0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not r.unchanged_since(start)


def test_a_grad_scaler_created_and_updated_during_the_step_is_a_change():
    model, optimizer = model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    r = registry(model=model, optimizer=optimizer, scaler=scaler)
    start = r.step_start(0)  # the scaler's tensors do not exist yet
    scaler.scale(model[0].weight.sum())  # creates them lazily
    assert not r.unchanged_since(start)
    again = r.step_start(1)
    scaler.update(2.0)  # a new scale, in place, with no optimizer step
    assert not r.unchanged_since(again)


def test_parameters_changed_outside_step_by_an_optimizer_of_another_library_are_a_change():
    class SAMLike(torch.optim.SGD):  # like SAM: first_step() perturbs the weights before step()
        def first_step(self):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(0.01)

    SAMLike.__module__ = "sam"
    model, _ = model_and_optimizer()
    optimizer = SAMLike(model.parameters(), lr=0.1)
    r = registry(model=model, optimizer=optimizer)
    start = r.step_start(0)
    optimizer.first_step()
    assert not r.unchanged_since(start)


class Ema:
    """A registered object that is no module: its state is tensors it updates in place, and a count."""

    def __init__(self, numel):
        self.shadow = torch.zeros(numel)
        self.updates = 0
        self.history = [0]

    def update(self):
        with torch.no_grad():
            self.shadow.mul_(0.9).add_(1.0)
        self.updates += 1
        self.history.append(self.updates)

    def state_dict(self):
        return {"shadow": self.shadow, "updates": self.updates, "history": self.history}

    def load_state_dict(self, state):
        self.shadow.copy_(state["shadow"])
        self.updates = state["updates"]
        self.history = list(state["history"])


def test_a_custom_objects_tensors_are_not_copied_at_a_step_start_and_its_other_state_is():
    ema = Ema(1000)
    r = registry(ema=ema)
    start = r.step_start(0)
    assert start.copied["ema"]["shadow"] is ema.shadow  # shared, not copied
    ema.history.append(99)  # a list it changes in place: the copy holds the step's start
    tree = r.tree_at(start, None)
    assert tree["objects"]["ema"]["history"] == [0] and tree["objects"]["ema"]["updates"] == 0


def test_a_custom_objects_tensor_changed_in_place_is_a_change():
    ema = Ema(1000)
    r = registry(ema=ema)
    start = r.step_start(0)
    assert r.unchanged_since(start)
    ema.update()
    assert not r.unchanged_since(start)


def test_a_custom_objects_tensor_replaced_leaves_the_step_start_in_the_copy():
    ema = Ema(4)
    r = registry(ema=ema)
    start = r.step_start(0)
    ema.shadow = ema.shadow + 1.0  # a new tensor: the old one is the step's start, untouched
    assert r.unchanged_since(start)
    assert torch.equal(r.tree_at(start, None)["objects"]["ema"]["shadow"], torch.zeros(4))


class Replay:
    """A replay buffer of NumPy arrays and a list (no version counters), counting its state_dict() calls."""

    def __init__(self, numel):
        self.frames = np.zeros(numel, dtype=np.float32)
        self.rewards = []
        self.calls = 0

    def state_dict(self):
        self.calls += 1
        return {"frames": self.frames, "rewards": self.rewards}

    def load_state_dict(self, state):
        self.frames[:] = state["frames"]
        self.rewards = list(state["rewards"])


def test_an_object_too_costly_to_copy_is_not_copied_and_the_state_its_step_started_from_is_unknown(caplog):
    replay, ema = Replay(2**23), Ema(4)  # 32 MB of float32: more than 2 ms of copying a step
    r = registry(replay=replay, ema=ema)
    first = r.step_start(0)
    assert first.uncopied == ("replay",) and "replay" not in first.copied and "ema" in first.copied
    assert r.unchanged_since(first) and not r.can_return_to(first)  # no tree_at without its start
    second = r.step_start(1)
    assert replay.calls == 1 and second.uncopied == ("replay",)  # decided once, at the first step
    (warning,) = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warning.startswith("'replay': its state_dict() holds values without version counters") and " ms " in warning
    r.register(False, more=Ema(4))  # a new object: the choice is made again at the next step
    r.step_start(2)
    assert replay.calls == 2


def test_an_object_whose_copy_grows_costly_is_copied_no_longer_from_the_next_step():
    replay = Replay(4)
    r = registry(replay=replay)
    assert r.step_start(0).uncopied == ()
    replay.rewards.extend(float(i) for i in range(400_000))  # a list that grew: tens of ms to copy
    start = r.step_start(1)
    assert start.uncopied == () and len(start.copied["replay"]["rewards"]) == 400_000  # this step's start is kept
    assert r.step_start(2).uncopied == ("replay",)


def test_the_copy_cost_estimate_follows_what_a_copy_costs():
    assert copy_cost_ns({"a": np.zeros(25 * 10**6 // 8)}) == pytest.approx(COPY_LIMIT_NS, rel=0.01)  # 25 MB
    assert copy_cost_ns([float(i) for i in range(10_000)]) == pytest.approx(1.7e6, rel=0.01)
    assert copy_cost_ns({"big": torch.zeros(10**7)}) < 1000  # tensors are shared, never copied
    loop: list = []
    loop.append(loop)  # a cycle is walked once
    assert copy_cost_ns(loop) == 500


def test_a_checkpoint_of_another_model_is_named_in_a_line_that_stays_short():
    """Another model differs in every tensor: the refusal names a few of each kind and counts the rest
    (a 2-layer GPT-2 of another width made a line of ~5 KB)."""
    from hydra_preempt.session.state import module_mismatches

    ours = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)])
    other = torch.nn.Sequential(*[torch.nn.Linear(5, 5) for _ in range(12)])
    problems = module_mismatches("model", ours, other.state_dict())
    assert problems[0] == "model: unexpected keys in the checkpoint: 10.bias, 10.weight, 11.bias, 11.weight"
    assert problems[1] == "model.0.bias: shape (5,) in the checkpoint, (4,) in this model"
    assert problems[-1] == "16 more tensors of another shape" and len(problems) == 6
    doubled = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)]).double()
    [dtypes] = module_mismatches("model", ours, doubled.state_dict())
    assert dtypes.endswith("model.1.weight (torch.float64 in the checkpoint, torch.float32 in this model) and 16 more")
