"""The only reader of SLURM's environment variables (and submitit's, which say how a task was started)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Mapping

# SLURM_STEP_ID of the batch script's own step: unset (22.05), or the batch step's id where a version sets it
BATCH_STEP_IDS = ("batch", "4294967291", "4294967294")


@dataclass(frozen=True)
class SlurmTask:
    """What SLURM's environment tells one task of a job about itself."""

    job_id: str
    rank: int  # in the run: the one of rank 0 requeues the job (policy.py)
    ntasks: int
    restart_count: int
    # started by the batch script itself, not by srun: SLURM signals job steps at a preemption's grace
    # start and at the time limit's --signal, so this process hears nothing until the final kill
    in_batch_step: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmTask | None:
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            return None
        # The workers torchrun starts in one task share its SLURM_PROCID: the run's rank is torchrun's
        # RANK (else every worker of task 0 requeued the job, and SLURM ended the step under the others
        # before they had written their stop). Only torchrun's (TORCHELASTIC_RUN_ID): a RANK left in the
        # environment of srun's tasks would make each of them rank 0.
        torchrun = "TORCHELASTIC_RUN_ID" in env and "RANK" in env
        return cls(
            job_id=job_id,
            rank=_int(env.get("RANK") if torchrun else env.get("SLURM_PROCID"), 0),
            ntasks=_int(env.get("SLURM_NTASKS"), 1),
            restart_count=_int(env.get("SLURM_RESTART_COUNT"), 0),
            in_batch_step=env.get("SLURM_STEP_ID", "batch") in BATCH_STEP_IDS,
        )


@dataclass(frozen=True)
class SrunStep:
    """The tasks of an srun job step, as SLURM describes them to each (torchrun's RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR from SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the step's first node).
    SLURM_STEP_NUM_TASKS is set by srun only: a batch script, one process however many tasks the job
    has, is no step of several tasks."""

    job_id: str
    step_id: str
    rank: int
    world_size: int
    local_rank: int
    first_host: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SrunStep | None:
        """The step this process is one task of, if it has more than one task; None otherwise."""
        env = os.environ if env is None else env
        tasks = _int(env.get("SLURM_STEP_NUM_TASKS"), 1)
        job_id = env.get("SLURM_JOB_ID")
        if tasks <= 1 or not job_id:
            return None
        return cls(
            job_id=job_id,
            step_id=env.get("SLURM_STEP_ID", "0"),
            rank=_int(env.get("SLURM_PROCID"), 0),
            world_size=tasks,
            local_rank=_int(env.get("SLURM_LOCALID"), 0),
            first_host=first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"),
        )

    def ports(self, configured: int | None, count: int = 8) -> list[int]:
        """The rendezvous ports to try, in order, the same on every task without any exchange: the
        configured one alone, else `count` ports of 15000-24999 drawn from a hash of the job and step id.
        A hash, not the job id's digits plus the step id (Lightning's way), under which job N's step 1
        and job N+1's step 0 on one node met on one port; several, so that a port another process holds
        is passed over (session/srun.py tells a store of its own step from another's)."""
        if configured is not None:
            return [configured]
        seed = int.from_bytes(hashlib.sha256(f"{self.job_id}.{self.step_id}".encode()).digest()[:8], "big")
        return [15000 + (seed + i * 1237) % 10000 for i in range(count)]

    @staticmethod
    def launched_by_torch(env: Mapping[str, str] | None = None) -> bool:
        """torchrun (or a launcher of the user's) set the process group's variables: its group, not ours."""
        env = os.environ if env is None else env
        return "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: 'gpu[07-09,12],cpu1' -> 'gpu07', 'r[1-2]-n[3-4]' -> 'r1-n3'."""
    host, i = [], 0
    while i < len(nodelist):
        c = nodelist[i]
        if c == ",":
            break
        if c == "[":
            end = nodelist.find("]", i)
            if end < 0:  # not a host list SLURM writes: the text before the bracket
                break
            host.append(re.split(r"[,-]", nodelist[i + 1 : end])[0])
            i = end + 1
            continue
        host.append(c)
        i += 1
    return "".join(host) or "localhost"


def under_submitit_local(env: Mapping[str, str] | None = None) -> bool:
    """True inside a task of submitit's local executor (which reruns a task that exits 144)."""
    env = os.environ if env is None else env
    return env.get("SUBMITIT_EXECUTOR") == "local"


def _int(value: str | None, default: int) -> int:
    return int(value) if value and value.isdecimal() else default
