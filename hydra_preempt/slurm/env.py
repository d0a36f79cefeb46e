"""The only reader of SLURM's environment variables (and submitit's, which say how a task was started)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class SlurmTask:
    """What SLURM's environment tells one task of a job about itself."""

    job_id: str
    rank: int
    ntasks: int
    restart_count: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmTask | None:
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            return None
        return cls(
            job_id=job_id,
            rank=_int(env.get("SLURM_PROCID"), 0),
            ntasks=_int(env.get("SLURM_NTASKS"), 1),
            restart_count=_int(env.get("SLURM_RESTART_COUNT"), 0),
        )


def under_submitit_local(env: Mapping[str, str] | None = None) -> bool:
    """True inside a task of submitit's local executor (which reruns a task that exits 144)."""
    env = os.environ if env is None else env
    return env.get("SUBMITIT_EXECUTOR") == "local"


def _int(value: str | None, default: int) -> int:
    return int(value) if value and value.isdigit() else default
