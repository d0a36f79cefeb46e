"""Whether a step has changed the registered state yet (it decides whether an emergency checkpoint is consistent).

The fingerprint no longer walks every tensor: optimizer steps are counted by a hook, and
only what may change outside an optimizer is watched. Each way a step can change state is here.
"""

import pytest
import torch

from hydra_preempt.session.state import StateRegistry


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
