"""One rank of a small FSDP2 run (started with torchrun by test_sharded.py), or a single process.

    python -m tests.integration.fsdp_worker RUN_DIR STEPS OUT.json

With FSDP_WORKER_EVERY=K, a periodic checkpoint every K steps (written in the
background); FSDP_WORKER_CHECKPOINT, JSON, sets more of the checkpoint section
(keep_last, async_save, cast_dtype). FSDP_WORKER_DTYPE=bfloat16 (or another
torch dtype) makes the model's parameters that dtype. With FSDP_WORKER_RANK_WITHOUT_WRITES=N, rank N may not write any file (its
RLIMIT_FSIZE is 0 from its last step on, so
every write fails with EFBIG): a real rank that cannot
write its shard. With FSDP_WORKER_RANK_KILLED_IN_SAVE=N, rank N SIGKILLs itself as the
final save begins writing its shard (a host OOM kill, a lost node, mid-save).

Trains a small MLP sharded with FSDP2 over all ranks (no per-rank objects: its
data are drawn from (step, rank)), then writes the SHA-256 of every full
parameter and optimizer tensor to OUT.json (rank 0), so that states written
and read at different world sizes can be compared.
"""

import hashlib
import json
import os
import resource
import signal
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hydra_preempt import SessionConfig, run
from hydra_preempt.checkpoint import sharded


def full_state_hashes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    flat = {f"model.{k}": v for k, v in model_state.items()}
    for fqn, state in optim_state["state"].items():
        flat.update({f"optim.{fqn}.{k}": v for k, v in state.items()})
    return {
        k: hashlib.sha256(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, v in sorted(flat.items())
        if isinstance(v, torch.Tensor)
    }


def train(session, steps: int, out: str) -> dict:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 3))
    dtype = getattr(torch, os.environ.get("FSDP_WORKER_DTYPE", "float32"))
    model.to(dtype)
    if dist.is_initialized():
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    session.register(model=model, optimizer=optimizer)
    session.restore()
    for step in session.steps(steps):
        g = torch.Generator().manual_seed(step * 100 + rank)
        x = torch.randn(8, 6, generator=g).to(dtype)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        session.report(loss=loss.item())
        if step == steps - 1 and os.environ.get("FSDP_WORKER_RANK_KILLED_IN_SAVE") == str(rank):

            def killed(*_args, **_kwargs):
                os.kill(os.getpid(), signal.SIGKILL)  # never returns

            sharded.save_shards = killed  # the checkpointer looks it up at each save
        if step == steps - 1 and os.environ.get("FSDP_WORKER_RANK_WITHOUT_WRITES") == str(rank):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # from the last step's save on
    hashes = full_state_hashes(model, optimizer)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(hashes, f, indent=1)
    return {"step": session.step}


if __name__ == "__main__":
    run_dir, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    every = int(os.environ.get("FSDP_WORKER_EVERY", "0")) or None  # periodic saves (in the background)
    checkpoint = {"every_steps": every, **json.loads(os.environ.get("FSDP_WORKER_CHECKPOINT", "{}"))}
    config = SessionConfig.from_mapping({"divergence": {"enabled": False}, "checkpoint": checkpoint})
    outcome = run(lambda session: train(session, steps, out), run_dir, config)
    print(
        f"rank {dist.get_rank() if dist.is_initialized() else 0}: {outcome.status.value} at step {outcome.step}: {outcome.message}",
        flush=True,
    )
    if dist.is_initialized():
        dist.destroy_process_group()  # gloo's threads end before the process does
    sys.exit(int(outcome.exit_code))
