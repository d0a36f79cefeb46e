"""The tasks of an srun job step become the ranks of one process group, as torchrun's would.

`srun python train.py` in a job of N tasks starts N processes. Without a process group they would be
N independent copies of the run in one run directory; with it they are N ranks of one run. The group
is formed from SLURM's variables (SrunStep), as Lightning's SLURMEnvironment and submitit's
JobEnvironment do: rank SLURM_PROCID of SLURM_STEP_NUM_TASKS, a TCP rendezvous on the step's first
node. NCCL where CUDA is, each rank on GPU SLURM_LOCALID; gloo otherwise.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import time
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
    if step.rank == 0:
        log.info("forming the process group of srun step %s.%s at %s", step.job_id, step.step_id, step.first_host)
    store, port = meet(step, step.ports(config.port), config.rendezvous_s)
    dist.init_process_group(backend, store=store, rank=step.rank, world_size=step.world_size)
    if step.rank == 0:
        log.info(
            "the %d tasks of step %s.%s are one process group (%s, at %s:%d)",
            step.world_size,
            step.job_id,
            step.step_id,
            backend,
            step.first_host,
            port,
        )
    try:
        yield
    finally:
        if dist.is_initialized():  # the training function may have destroyed it already
            dist.destroy_process_group()


def meet(step: SrunStep, ports: list[int], within_s: float) -> tuple[dist.Store, int]:
    """The step's tasks meet at a TCP store on its first host: rank 0 serves it on the first of `ports`
    it can bind and marks it with the step's id; every other rank takes the first of `ports` that
    serves a store so marked, so that a port another step (or anything else) holds is passed over, on
    both sides, the same way. Rounds over the ports until `within_s` has passed: then ConfigError,
    one line (a rank whose peers never come ends, never hangs). Returns the store (the step's keys
    under its id) and the port."""
    name = f"{step.job_id}.{step.step_id}"
    deadline = time.monotonic() + within_s
    found: tuple[dist.TCPStore, int] | None = None
    while found is None and time.monotonic() < deadline:
        for port in ports:
            store = _serve(step, port, name) if step.rank == 0 else _join(step, port, name)
            if store is not None:
                found = store, port
                break
        else:
            time.sleep(0.2)
    if found is None:
        why = "no port was free" if step.rank == 0 else "rank 0 served none of them"
        raise _not_met(step, ports, within_s, why)
    store, port = found
    try:
        store.set_timeout(dt.timedelta(seconds=within_s))
        store.add(f"{name}/joined", 1)  # every rank waits for all, as long as the rest of `within_s`
        while (joined := store.add(f"{name}/joined", 0)) < step.world_size:
            if time.monotonic() > deadline:
                raise _not_met(step, [port], within_s, f"{step.world_size - joined} never came")
            time.sleep(0.1)
    except RuntimeError as e:  # rank 0 gave up (its store is gone) while this rank waited
        raise _not_met(step, [port], within_s, f"the store went away: {str(e).splitlines()[0][:120]}") from None
    return dist.PrefixStore(name, store), port


def _not_met(step: SrunStep, ports: list[int], within_s: float, why: str) -> ConfigError:
    what = f"port {ports[0]}" if len(ports) == 1 else f"ports {', '.join(map(str, ports))}"
    return ConfigError(
        f"the {step.world_size} tasks of srun step {step.job_id}.{step.step_id} did not meet at {step.first_host} "
        f"on {what} within {within_s:g} s ({why}): set distributed.port to a port free on that host, or "
        "distributed.rendezvous_s"
    )


_STEP_KEY = "hydra_preempt/srun_step"


def _serve(step: SrunStep, port: int, name: str) -> dist.TCPStore | None:
    """Rank 0: a store on `port` marked as step `name`'s, or None if the port is taken."""
    try:
        store = dist.TCPStore(step.first_host, port, step.world_size, is_master=True, wait_for_workers=False)
    except RuntimeError:  # DistNetworkError: the port is held by another process
        return None
    store.set(_STEP_KEY, name)
    return store


def _join(step: SrunStep, port: int, name: str) -> dist.TCPStore | None:
    """Another rank: the store on `port` if it is step `name`'s, else None (nothing there yet, another
    step's store, or no store at all)."""
    try:  # first a plain connection, which fails in silence where nothing listens yet (torch's client logs)
        socket.create_connection((step.first_host, port), timeout=_JOIN_TRY.total_seconds()).close()
    except OSError:
        return None
    try:
        store = dist.TCPStore(
            step.first_host, port, step.world_size, is_master=False, timeout=_JOIN_TRY, wait_for_workers=False
        )
        if store.check([_STEP_KEY]) and store.get(_STEP_KEY).decode() == name:
            return store
    except RuntimeError:  # refused, timed out, or not a store
        pass
    return None


_JOIN_TRY = dt.timedelta(seconds=2.0)  # the longest wait for a port's answer
