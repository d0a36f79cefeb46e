"""Many short runs, each ending its process the normal way, counting the ones that die at exit.

    python -m tests.integration.exit_repeat [--runs 200] [--ranks 1|2] [--workers 0]

A process whose run finished must exit 0. A thread or process group left alive inside torch while the
interpreter shuts down aborts it instead ("terminate called without an active exception", SIGABRT):
rare, so it takes many runs to see. Each run is a child forked from this process after torch is
imported (torch's import would dominate the cost of a fresh interpreter), which trains a few steps
through `run()` (a shuffled DataLoader registered, background saves, with 2 ranks DDP over gloo), then
returns from its code to the interpreter's own shutdown: no os._exit, no multiprocessing (which skips it).
Prints the count of abnormal ends by kind; exits 1 if there was any.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hydra_preempt import ExitCode, run


def train(session):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    dataset = TensorDataset(x, x.sum(1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    workers = int(os.environ["EXIT_REPEAT_WORKERS"])
    if dist.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=workers)
        forward = torch.nn.parallel.DistributedDataParallel(model)
        session.register(model=model, optimizer=optimizer)
        session.register_per_rank(data=loader)
    else:
        loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers)
        forward = model
        session.register(model=model, optimizer=optimizer, data=loader)
    session.restore()
    for _ in session.epochs(2):
        for inputs, targets in session.batches(loader):
            loss = torch.nn.functional.mse_loss(forward(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.report(loss=loss.item())
    return {}


def one_run(run_dir: Path, rank: int, ranks: int, port: int) -> int:
    """In the child: the exit code its run asks for."""
    if ranks > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks))
        dist.init_process_group("gloo")
    config = {"checkpoint": {"every_steps": 3, "async_save": True}, "divergence": {"enabled": False}}
    try:
        outcome = run(train, run_dir, config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return int(outcome.exit_code)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.integration.exit_repeat", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--ranks", type=int, choices=(1, 2), default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    os.environ["EXIT_REPEAT_WORKERS"] = str(args.workers)
    ends: collections.Counter[str] = collections.Counter()
    torch.set_num_threads(1)  # no OpenMP pool in this process: a child forked after one could hang in it
    # not a TemporaryDirectory: a forked child leaves through this block too (SystemExit), and its clean-up
    # removed the directory under a rank still writing its result (a CI failure)
    parent, base = os.getpid(), tempfile.mkdtemp()
    try:
        one_run(Path(base) / "warm-up", 0, 1, 0)  # the library's first-use imports, once, before the forks
        for i in range(args.runs):
            run_dir, port = Path(base) / f"run-{i}", free_port()
            children = []
            for rank in range(args.ranks):
                pid = os.fork()
                if pid == 0:  # the child leaves through the interpreter's shutdown, as a training script does
                    raise SystemExit(one_run(run_dir, rank, args.ranks, port))
                children.append(pid)
            for pid in children:
                ends[describe(os.waitpid(pid, 0)[1])] += 1
    finally:
        if os.getpid() == parent:
            shutil.rmtree(base, ignore_errors=True)
    normal = f"exit code {int(ExitCode.FINISHED)}"
    abnormal = {kind: n for kind, n in ends.items() if kind != normal}
    print(f"{args.runs} runs of {args.ranks} rank(s), {args.workers} loader workers: {ends[normal]} processes exited 0")
    for kind, n in sorted(abnormal.items()):
        print(f"  {n} {kind}")
    return 1 if abnormal else 0


if __name__ == "__main__":
    sys.exit(main())
