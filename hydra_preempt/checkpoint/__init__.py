"""Checkpoint storage: one atomic, verified directory per checkpoint, with retention."""

from .retention import CheckpointRecord, RetentionPlan, RetentionPolicy
from .store import REASONS, CheckpointInfo, CheckpointStore
from .writer import CorruptCheckpointError, Snapshot

__all__ = [
    "REASONS",
    "CheckpointInfo",
    "CheckpointRecord",
    "CheckpointStore",
    "CorruptCheckpointError",
    "RetentionPlan",
    "RetentionPolicy",
    "Snapshot",
]
