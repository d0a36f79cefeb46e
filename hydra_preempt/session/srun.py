"""The tasks of an srun job step become the ranks of one process group, as torchrun's would.

`srun python train.py` in a job of N tasks starts N processes. Without a process group they would be
N independent copies of the run in one run directory; with it they are N ranks of one run. The group
is formed from SLURM's variables (SrunStep), as Lightning's SLURMEnvironment and submitit's
JobEnvironment do: rank SLURM_PROCID of SLURM_STEP_NUM_TASKS, a TCP rendezvous on the step's first
node. NCCL where CUDA is, each rank on GPU SLURM_LOCALID; gloo otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.distributed as dist

from ..config import DistributedConfig
from ..errors import ConfigError
from ..slurm.env import SrunStep

log = logging.getLogger("hydra_preempt")


@contextlib.contextmanager
def srun_process_group(config: DistributedConfig, step: SrunStep | None) -> Iterator[None]:
    """While a run lasts: the step's process group, if this process is one task of several, no group
    exists yet and no torch launcher set one up (then the group is theirs: nothing is done)."""
    if step is None or not config.srun or dist.is_initialized() or SrunStep.launched_by_torch():
        yield
        return
    if not 0 <= step.rank < step.world_size:
        raise ConfigError(
            f"SLURM_PROCID={step.rank} is no task of an srun step of SLURM_STEP_NUM_TASKS={step.world_size}: "
            "SLURM's variables do not describe this process (set distributed.srun: false to ignore them)"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(step.local_rank % torch.cuda.device_count())
    address = f"{step.first_host}:{step.port(config.port)}"
    if step.rank == 0:
        log.info("forming the process group of srun step %s.%s at %s", step.job_id, step.step_id, address)
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=step.rank, world_size=step.world_size)
    if step.rank == 0:
        log.info(
            "the %d tasks of step %s.%s are one process group (%s, at %s)",
            step.world_size,
            step.job_id,
            step.step_id,
            backend,
            address,
        )
    try:
        yield
    finally:
        if dist.is_initialized():  # the training function may have destroyed it already
            dist.destroy_process_group()
