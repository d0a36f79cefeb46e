"""A researcher's own training script, as the README's "Your own training script" writes it.

    python -m tests.integration.own_script RUN_DIR [--epochs 4] [--workers 0] [--loader plain|persistent|stateful]
                                               [--augment] [--evaluate-s S [--announce]]
    (with WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT: one rank of a DDP run over gloo)

A standard DataLoader(shuffle=True), an epoch loop, dropout; no logging set up,
so what the library says goes to stderr by itself. With --augment, random noise
from torch's, NumPy's and Python's generators in __getitem__, inside the
workers (as a vision pipeline's augmentations). Prints "step N" after each
step (tests signal it there). With --evaluate-s, an evaluation of that many
seconds after the first epoch's 3rd step, announced to the watchdog with
--announce (allowance: 2 s a step, 30 s an announced phase). Several ranks:
DDP, a DistributedSampler with set_epoch, the loader registered per rank.
"""

import argparse
import hashlib
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hydra_preempt import exit_with, run


class Augmented(torch.utils.data.Dataset):
    """A random augmentation: noise from the global generators of whichever process fetches."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x + torch.rand_like(x) * 0.1 + float(np.random.uniform(0, 0.1)) + random.random() * 0.1, y


def say(line: str) -> None:
    """One line on stdout in one write: the ranks under torchrun share the pipe, and its workers run
    with `python -u` (print() then writes the text and its newline apart: two ranks made "step 13step 13")."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_loader(kind: str, dataset: torch.utils.data.Dataset, workers: int) -> DataLoader:
    """A shuffled loader of 32-sample batches: torch's, with persistent workers, or torchdata's."""
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers)
    persistent = {"persistent_workers": True} if kind == "persistent" else {}
    return DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers, **persistent)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--loader", choices=("plain", "persistent", "stateful"), default="plain")
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--evaluate-s", type=float, default=0.0)
    parser.add_argument("--announce", action="store_true")
    args = parser.parse_args()

    ranks = dist.is_initialized()

    def train(session):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
        tensors = TensorDataset(x, x.sum(1, keepdim=True))
        dataset = Augmented(tensors) if args.augment else tensors
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if ranks:
            torch.manual_seed(dist.get_rank())  # each rank its own dropout
            sampler = DistributedSampler(dataset, shuffle=True, seed=0)
            loader = DataLoader(dataset, batch_size=16, sampler=sampler, num_workers=args.workers)
            forward = torch.nn.parallel.DistributedDataParallel(model)
            session.register(model=model, optimizer=optimizer)
            session.register_per_rank(data=loader)
        else:
            loader = make_loader(args.loader, dataset, args.workers)
            forward = model
            session.register(model=model, optimizer=optimizer, data=loader)
        session.restore()
        for epoch in session.epochs(args.epochs):
            say(f"epoch {epoch}")
            if ranks:
                sampler.set_epoch(epoch)
            for inputs, targets in session.batches(loader):
                loss = torch.nn.functional.mse_loss(forward(inputs), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                session.report(loss=loss.item())
                say(f"step {session.step + 1}")
                if args.evaluate_s and session.step == 2 and session.resumed_from is None:
                    if args.announce:
                        with session.long_phase("evaluation", allowed_s=30):
                            time.sleep(args.evaluate_s)
                    else:
                        time.sleep(args.evaluate_s)
                time.sleep(0.02)
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        return {"params_sha256": digest, "epochs": args.epochs}

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    config = {"checkpoint": {"every_steps": 8}, "watchdog": {"timeout_s": 2.0}, "progress": {"every_s": 0.05}}
    outcome = run(train, args.run_dir, config)
    if dist.is_initialized():
        dist.destroy_process_group()
    exit_with(outcome)


if __name__ == "__main__":
    sys.exit(main())
