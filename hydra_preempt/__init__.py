"""Preemption-safe training: exact resume, atomic verified checkpoints, retention, divergence stop."""

from .config import CheckpointConfig, DivergenceConfig, SessionConfig, SignalConfig
from .data import ResumableLoader
from .errors import (
    CheckpointDirError,
    CheckpointMismatchError,
    CheckpointWriteError,
    ConfigError,
    HydraPreemptError,
)
from .outcome import ExitCode, Outcome, Status
from .preemption import conclude, exit_with
from .session import RunStopped, Session, run

__all__ = [
    "CheckpointConfig",
    "CheckpointDirError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "ConfigError",
    "DivergenceConfig",
    "ExitCode",
    "HydraPreemptError",
    "Outcome",
    "ResumableLoader",
    "RunStopped",
    "Session",
    "SessionConfig",
    "SignalConfig",
    "Status",
    "conclude",
    "exit_with",
    "run",
]
