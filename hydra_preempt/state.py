"""Random-number-generator state of a process: Python, NumPy, torch CPU and every CUDA device."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger("hydra_preempt")


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": [],
    }
    # Only read CUDA generators that exist already: touching them would
    # initialise CUDA in a process that never used it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    saved = state.get("torch_cuda") or []
    if not saved:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(saved):
        log.warning(
            "checkpoint holds the RNG state of %d CUDA device(s), this process sees %d: "
            "restoring the first %d; random streams on other devices start fresh",
            len(saved), available, min(available, len(saved)),
        )
    for i, s in enumerate(saved[:available]):
        torch.cuda.set_rng_state(s, i)
