"""A researcher's own training script, as the README's "Your own training script" writes it.

    python -m tests.integration.own_script RUN_DIR [--epochs 4] [--workers 0] [--evaluate-s S [--announce]]

A standard DataLoader(shuffle=True), an epoch loop, dropout; no logging set up,
so what the library says goes to stderr by itself. Prints "step N" after each
step (tests signal it there). With --evaluate-s, an evaluation of that many
seconds after the first epoch's 3rd step, announced to the watchdog with
--announce (allowance: 2 s a step, 30 s an announced phase).
"""

import argparse
import hashlib
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from hydra_preempt import exit_with, run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--evaluate-s", type=float, default=0.0)
    parser.add_argument("--announce", action="store_true")
    args = parser.parse_args()

    def train(session):
        torch.manual_seed(0)
        x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
        dataset = TensorDataset(x, x.sum(1, keepdim=True))
        loader = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=args.workers)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        session.register(model=model, optimizer=optimizer, data=loader)
        session.restore()
        for epoch in session.epochs(args.epochs):
            print(f"epoch {epoch}", flush=True)
            for inputs, targets in session.batches(loader):
                loss = torch.nn.functional.mse_loss(model(inputs), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                session.report(loss=loss.item())
                print(f"step {session.step + 1}", flush=True)
                if args.evaluate_s and session.step == 2 and session.resumed_from is None:
                    if args.announce:
                        with session.long_phase("evaluation", allowed_s=30):
                            time.sleep(args.evaluate_s)
                    else:
                        time.sleep(args.evaluate_s)
                time.sleep(0.02)
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        return {"params_sha256": digest, "epochs": args.epochs}

    config = {"checkpoint": {"every_steps": 8}, "watchdog": {"timeout_s": 2.0}, "progress": {"every_s": 0.05}}
    exit_with(run(train, args.run_dir, config))


if __name__ == "__main__":
    sys.exit(main())
