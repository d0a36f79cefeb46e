"""The rendezvous of an srun step's tasks (session/srun.py) with real processes on this machine: two
steps whose first ports coincide meet at once, and a rank whose peer never comes ends in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hydra_preempt.slurm.env import SrunStep

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

# One task of an srun step: the process group, an all-reduce of rank + 1, the sum printed.
TASK = """
import sys
import torch, torch.distributed as dist
from hydra_preempt.config import DistributedConfig
from hydra_preempt.errors import ConfigError
from hydra_preempt.session.srun import srun_process_group
from hydra_preempt.slurm.env import SrunStep

job, step_id, rank, world, within = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
step = SrunStep(job, step_id, rank=rank, world_size=world, local_rank=rank, first_host="127.0.0.1")
try:
    with srun_process_group(DistributedConfig(rendezvous_s=within), step):
        value = torch.tensor([rank + 1.0])
        dist.all_reduce(value)
        print(f"step {job}.{step_id} rank {rank} sum {int(value.item())}", flush=True)
except ConfigError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def task(job: str, step: str, rank: int, world: int, within: float = 60.0) -> subprocess.Popen:
    args = [sys.executable, "-c", TASK, job, step, str(rank), str(world), str(within)]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def colliding_job(job: str, step: str) -> str:
    """Another job's id whose step 0 starts on the first port of `job`'s step `step`."""
    first = SrunStep(job, step, 0, 2, 0, "h").ports(None)[0]
    return next(
        str(other)
        for other in range(int(job) + 1, 10**7)
        if SrunStep(str(other), "0", 0, 2, 0, "h").ports(None)[0] == first
    )


def test_two_steps_whose_first_ports_coincide_each_meet_on_their_own():
    job_a = "41001"
    job_b = colliding_job(job_a, "1")
    procs = [task(job_a, "1", 0, 2), task(job_b, "0", 0, 2), task(job_b, "0", 1, 2), task(job_a, "1", 1, 2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    said = sorted(out.strip() for out, _ in outputs)
    assert said == sorted(f"step {j} rank {r} sum 3" for j in (f"{job_a}.1", f"{job_b}.0") for r in (0, 1))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peer_never_comes_ends_in_one_line(rank):
    job = f"4102{rank}"  # a step of its own for each case: two cases at once in two test workers must not meet
    proc = task(job, "0", rank, 2, within=3.0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    assert err.count("\n") == 1 and f"the 2 tasks of srun step {job}.0 did not meet at 127.0.0.1" in err, err
    assert "set distributed.port to a port free on that host, or distributed.rendezvous_s" in err
