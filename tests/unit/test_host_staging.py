"""Host staging for background saves: copies (never aliases), buffers reused while shapes hold, bounded to one state."""

import numpy as np
import torch

from hydra_preempt.checkpoint.tree import HostStaging, flatten, unflatten


def state(n=3, width=4):
    return {"w": [torch.full((width,), float(i)) for i in range(n)], "rng": np.arange(5, dtype=np.uint32), "step": 7}


def test_staged_arrays_are_copies_taken_at_capture():
    s = state()
    staging = HostStaging()
    skeleton, arrays = flatten(s, staging)
    s["w"][0].add_(100)  # training goes on, in place
    s["rng"][:] = 0
    back = unflatten(skeleton, arrays)
    assert back["w"][0].tolist() == [0.0] * 4 and back["rng"].tolist() == [0, 1, 2, 3, 4] and back["step"] == 7


def test_buffers_are_reused_while_shapes_hold_and_replaced_when_they_change():
    staging = HostStaging()
    _, first = flatten(state(), staging)
    _, second = flatten(state(), staging)
    assert all(a is b for a, b in zip(first, second))
    _, third = flatten(state(width=6), staging)
    assert all(a is not b for a, b in zip(first[:3], third[:3])) and third[3] is first[3]


def test_staging_holds_one_state_and_no_more():
    staging = HostStaging()
    flatten(state(n=5), staging)
    flatten(state(n=2), staging)
    assert staging.nbytes == 2 * 4 * 4 + 5 * 4
