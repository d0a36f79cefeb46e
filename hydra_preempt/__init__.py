"""Preemption-safe training: exact resume, atomic verified checkpoints, retention, divergence stop.

The public API is re-exported here and imported on first use, so that light
users (Hydra's plugin discovery, `hydra-preempt status`) never load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CheckpointConfig": "config",
    "DivergenceConfig": "config",
    "SessionConfig": "config",
    "SignalConfig": "config",
    "ResumableLoader": "data",
    "CheckpointDirError": "errors",
    "CheckpointMismatchError": "errors",
    "CheckpointWriteError": "errors",
    "ConfigError": "errors",
    "HydraPreemptError": "errors",
    "ExitCode": "outcome",
    "Outcome": "outcome",
    "Status": "outcome",
    "RunStopped": "session.api",
    "Session": "session.api",
    "JobContext": "session.runner",
    "run": "session.runner",
    "conclude": "slurm.policy",
    "exit_with": "slurm.policy",
    "ExecutorSettings": "doors.settings",
    "PreemptibleTask": "doors.submitit",
    "preemptible_executor": "doors.submitit",
    "run_hydra_app": "doors.hydra_app",
}

__all__ = [
    "CheckpointConfig",
    "CheckpointDirError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "ConfigError",
    "DivergenceConfig",
    "ExecutorSettings",
    "ExitCode",
    "HydraPreemptError",
    "JobContext",
    "Outcome",
    "PreemptibleTask",
    "ResumableLoader",
    "RunStopped",
    "Session",
    "SessionConfig",
    "SignalConfig",
    "Status",
    "conclude",
    "exit_with",
    "preemptible_executor",
    "run",
    "run_hydra_app",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hydra_preempt' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


if TYPE_CHECKING:
    from .config import CheckpointConfig, DivergenceConfig, SessionConfig, SignalConfig
    from .data import ResumableLoader
    from .doors.hydra_app import run_hydra_app
    from .doors.settings import ExecutorSettings
    from .doors.submitit import PreemptibleTask, preemptible_executor
    from .errors import (
        CheckpointDirError,
        CheckpointMismatchError,
        CheckpointWriteError,
        ConfigError,
        HydraPreemptError,
    )
    from .outcome import ExitCode, Outcome, Status
    from .session.api import RunStopped, Session
    from .session.runner import JobContext, run
    from .slurm.policy import conclude, exit_with
