"""Train a small MLP on synthetic regression data, preemption-safe.

    python train.py hydra.run.dir=runs/a trainer.max_steps=500
    kill -TERM <pid>        # saves at the next step boundary, exits 75
    python train.py hydra.run.dir=runs/a trainer.max_steps=500   # continues at the exact step

The run directory ends up with checkpoints/, run_log.jsonl, metrics.jsonl and
result.json (step, loss, params_sha256, restarts).
"""

from __future__ import annotations

if __name__ == "__main__":  # a training process (not a test importing this module): guard its start-up
    import hydra_preempt.guard  # noqa: F401  first, before torch: a stop signal meanwhile is kept for run()


import hashlib
import time

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import TensorDataset

from hydra_preempt import ResumableLoader, Session, SessionConfig
from hydra_preempt.config import Rule
from hydra_preempt.doors import hydra_app

POSITIVE_INT = Rule(int, "a positive integer below 2**62", lambda v: 0 < v < 2**62)
NATURAL = Rule(int, "an integer >= 0 below 2**62", lambda v: 0 <= v < 2**62)
NON_NEGATIVE = Rule(float, "a finite number >= 0", lambda v: v >= 0)

# Every key of train.py's own sections (conf/config.yaml); the session's sections are hydra_preempt's.
KEYS = {
    "trainer.max_steps": POSITIVE_INT,
    "trainer.seed": NATURAL,
    "trainer.batch_size": POSITIVE_INT,
    "trainer.log_every": POSITIVE_INT,
    "trainer.threads": Rule(int, "an integer from 1 to 4096", lambda v: 1 <= v <= 4096),
    "trainer.step_sleep": NON_NEGATIVE,
    "trainer.parallel": Rule(str, "ddp or fsdp", lambda v: v in ("ddp", "fsdp")),
    "model.hidden": POSITIVE_INT,
    "model.depth": NATURAL,  # 0: a linear model
    "model.dropout": Rule(float, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "data.samples": POSITIVE_INT,
    "data.features": POSITIVE_INT,
    "data.noise": NON_NEGATIVE,
    "data.seed": NATURAL,
    "data.num_workers": Rule(int, "an integer from 0 to 64", lambda v: 0 <= v <= 64),
    "optim.lr": Rule(float, "a finite number > 0", lambda v: v > 0),
    "optim.weight_decay": NON_NEGATIVE,
}


def make_dataset(cfg: DictConfig) -> TensorDataset:
    """Inputs from a Gaussian, targets from a fixed random teacher network plus noise."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.samples, cfg.features, generator=g)
    w1 = torch.randn(cfg.features, 32, generator=g) / cfg.features**0.5
    w2 = torch.randn(32, 1, generator=g) / 32**0.5
    y = torch.tanh(x @ w1) @ w2 + cfg.noise * torch.randn(cfg.samples, 1, generator=g)
    return TensorDataset(x, y)


def make_model(cfg: DictConfig, features: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    width = features
    for _ in range(cfg.depth):
        layers += [torch.nn.Linear(width, cfg.hidden), torch.nn.GELU(), torch.nn.Dropout(cfg.dropout)]
        width = cfg.hidden
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


def params_sha256(model: torch.nn.Module, sharded: bool) -> str:
    """Of the full parameters (a collective when they are sharded: every rank must call it)."""
    h = hashlib.sha256()
    if sharded:  # FSDP2's DTensors, gathered
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = model.state_dict()
    for name, tensor in state.items():
        assert isinstance(tensor, torch.Tensor)
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(session: Session, cfg: DictConfig) -> dict:
    """Single process, or data-parallel when torch.distributed is initialised: DDP, or FSDP2
    (`trainer.parallel=fsdp`: parameters and optimizer state sharded over the ranks)."""
    t = cfg.trainer
    torch.set_num_threads(t.threads)  # results are bit-exact for a fixed thread count
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(t.seed)  # the same initial model on every rank
    dataset = make_dataset(cfg.data)
    model = make_model(cfg.model, cfg.data.features)
    torch.manual_seed(t.seed + rank)  # but each rank its own dropout stream
    sharded = distributed and t.parallel == "fsdp"
    if sharded:  # imported here, not by every process that imports this module (a sweep's launcher)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
        forward = model
    else:
        forward = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.max_steps)
    loader = ResumableLoader(
        dataset,
        batch_size=t.batch_size,
        seed=t.seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.data.num_workers,  # worker processes, as real training has: signalled with the step
    )
    session.register(model=model, optimizer=optimizer, scheduler=scheduler)
    session.register_per_rank(data=loader)

    start = session.restore()
    print(f"starting at step {start} of {t.max_steps}", flush=True)
    model.train()
    for step in session.steps(t.max_steps):
        x, y = next(loader)
        loss = F.mse_loss(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        session.report(loss=loss.item())
        if (step + 1) % t.log_every == 0:
            print(f"step {step + 1} loss {loss.item():.6f}", flush=True)
        if t.step_sleep:
            time.sleep(t.step_sleep)

    model.eval()
    with torch.no_grad():
        x, y = dataset.tensors
        final_loss = F.mse_loss(model(x), y).item()
    result = {
        "step": session.step,
        "loss": final_loss,
        "params_sha256": params_sha256(model, sharded),
        "restarts": session.restarts,
        "resumed_from": session.resumed_from,
    }
    session.write_result(result)
    return result


def session_config(cfg: DictConfig) -> SessionConfig:
    """Check every key of the app config (KEYS, then the session's sections); return the session's part."""
    return hydra_app.session_config(cfg, KEYS)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    # a bad value: one line, exit 2, before anything runs; a plain run ends the process with the
    # outcome's exit code (requeueing under SLURM); a sweep job returns it to the launcher
    return hydra_app.run_hydra_app(train, cfg, KEYS)


if __name__ == "__main__":
    main()
