"""The child processes of `hydra-preempt validate`: real saves, a real run(), real collectives.

    python -m hydra_preempt.validate.worker save-loop DIR MEGABYTES
    python -m hydra_preempt.validate.worker train RUN_DIR MAX_STEPS STEP_SLEEP_S
    python -m hydra_preempt.validate.worker allreduce BACKEND RANK WORLD_SIZE PORT

Each prints one line per event it reaches (flushed), which checks.py waits for before it
sends a signal, so that signals land at known points and not at start-up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import sys
import time
from pathlib import Path

import torch


def save_loop(directory: Path, megabytes: int) -> None:
    """Save checkpoints of a state of `megabytes` forever; the parent SIGKILLs it during one."""
    from ..checkpoint.store import CheckpointStore
    from ..checkpoint.writer import Snapshot

    store = CheckpointStore(directory)
    store.prepare()
    weights = torch.zeros(megabytes * 2**18)  # float32: 4 bytes each
    step = 0
    while True:
        step += 1
        weights.fill_(float(step))
        print(f"saving {step}", flush=True)
        store.save(Snapshot.capture({"w": weights, "step": step}), step, "periodic")
        print(f"saved {step}", flush=True)


def params_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(run_dir: Path, max_steps: int, step_sleep_s: float) -> int:
    """A small model trained through run(): what the exit code, checkpoints and parameter hash are checked on."""
    from ..config import SessionConfig
    from ..data import ResumableLoader
    from ..session.api import Session
    from ..session.runner import JobContext, run

    def fn(session: Session) -> dict:
        torch.set_num_threads(1)  # bit-exact results need a fixed thread count
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loader = ResumableLoader(data, batch_size=16, seed=0)
        session.register(model=model, optimizer=optimizer, data=loader)
        for step in session.steps(max_steps):
            x, y = next(loader)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            session.report(loss=loss.item())
            print(f"step {step + 1}", flush=True)
            time.sleep(step_sleep_s)
        result = {"step": session.step, "params_sha256": params_sha256(model)}
        session.write_result(result)
        return result

    # No SLURM here even inside a job: this checks the session's own protocol, not the scheduler's
    outcome = run(fn, run_dir, SessionConfig(), JobContext(slurm_task=None, ends_process=True))
    print(f"outcome {outcome.status.value} {outcome.step}", flush=True)
    return int(outcome.exit_code)


def allreduce(backend: str, rank: int, world_size: int, port: int) -> int:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # this child's own environment
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=dt.timedelta(seconds=30))
    try:
        device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
        value = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(value)
        print(f"sum {value.item():g}", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: list[str]) -> int:
    mode, *args = argv
    if mode == "save-loop":
        save_loop(Path(args[0]), int(args[1]))
        return 0
    if mode == "train":
        return train(Path(args[0]), int(args[1]), float(args[2]))
    if mode == "allreduce":
        return allreduce(args[0], int(args[1]), int(args[2]), int(args[3]))
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    from ..errors import HydraPreemptError

    try:
        sys.exit(main(sys.argv[1:]))
    except HydraPreemptError as e:  # a full or unusable disk: the parent shows this line as the reason
        print(f"error: {e}", flush=True)
        sys.exit(1)
