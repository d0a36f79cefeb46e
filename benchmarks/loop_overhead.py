"""What a training loop pays per step for its loader's position and the emergency rule, side by side
with a plain loop and Lightning's `barebones=True` Trainer on the same model and data.

    python benchmarks/loop_overhead.py [--steps 2000] [--repeats 5]

A small MLP (32 -> 64 -> 1, SGD, a per-step StepLR) over a shuffled `DataLoader` of 4-sample batches,
no workers, checkpoints off: a step costs a few hundred microseconds, so what each loop adds shows.
Cases, interleaved in each repeat (medians, min and max over repeats, microseconds per step):

- plain: `for x, y in loader:` with the step;
- session: `session.epochs()` / `session.batches(loader)` with model, optimizer, scheduler and the
  loader registered (the documented loop), emergency checkpoints on (the default);
- session, emergency off: the same with `checkpoint.emergency: false`;
- session, StatefulDataLoader: torchdata's loader in the documented loop;
- session, 2 loaders: two registered loaders, an epoch a pass over each (two batches() loops);
- Lightning barebones: `Trainer(barebones=True, max_steps=...)` with a LightningModule doing the
  same step (when `lightning` is installed), timed from its 100th step (its set-up left out);
- Lightning barebones, fit(): the same Trainer under `hydra_preempt.lightning.fit` (the protocol:
  the positioned loader, a boundary per step, checkpoints off), timed alike;
- HF Trainer: a `transformers.Trainer` (SGD, constant LR, one log line at the end, no saves) doing the
  same step (when `transformers` is installed), timed from its 100th step;
- HF Trainer, train(): the same under `hydra_preempt.transformers.train`, timed alike.

The added cost is each case's median minus the plain loop's, and its share of a 100 ms step; the
last lines are what fit() adds to Lightning's own loop and what train() adds to Trainer's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from hydra_preempt import SessionConfig, run


def dataset() -> TensorDataset:
    x = torch.randn(4096, 32, generator=torch.Generator().manual_seed(1))
    return TensorDataset(x, x.sum(1, keepdim=True))


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 100)


def train_step(model, optimizer, scheduler, x, y) -> torch.Tensor:
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss


def plain(steps: int) -> float:
    model, optimizer, scheduler = model_and_optimizer()
    loader = DataLoader(dataset(), batch_size=4, shuffle=True)
    done, began = 0, time.perf_counter()
    while done < steps:
        for x, y in loader:
            train_step(model, optimizer, scheduler, x, y)
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - began) / steps * 1e6


def session_loop(steps: int, kind: str = "dataloader", emergency: bool = True) -> float:
    config = SessionConfig.from_mapping(
        {"checkpoint": {"every_steps": None, "emergency": emergency}, "divergence": {"enabled": False}}
    )
    measured: dict[str, float] = {}

    def train(session):
        model, optimizer, scheduler = model_and_optimizer()
        if kind == "stateful":
            from torchdata.stateful_dataloader import StatefulDataLoader

            loader: DataLoader = StatefulDataLoader(dataset(), batch_size=4, shuffle=True)
        else:
            loader = DataLoader(dataset(), batch_size=4, shuffle=True)
        loaders = [loader]
        if kind == "two loaders":  # an epoch: a pass over each, one after the other
            loaders.append(DataLoader(dataset(), batch_size=4, shuffle=True))
            session.register(aux=loaders[1])
        session.register(model=model, optimizer=optimizer, scheduler=scheduler, data=loader)
        session.restore()
        done, began = 0, time.perf_counter()
        for _ in session.epochs(10**6, loader=loader):
            for each in loaders:
                for x, y in session.batches(each):
                    train_step(model, optimizer, scheduler, x, y)
                    done += 1
                    if done == steps:
                        break
                if done == steps:
                    break
            if done == steps:
                break
        measured["us"] = (time.perf_counter() - began) / steps * 1e6

    with tempfile.TemporaryDirectory() as run_dir:
        run(train, run_dir, config)
    return measured["us"]


def lightning_barebones(steps: int, protocol: bool = False) -> float | None:
    """Lightning's loop alone (`protocol`: under hydra_preempt.lightning.fit), timed from its 100th step to
    its last, so that neither set-up is in the figure."""
    try:
        import lightning as L
    except ImportError:
        return None
    from hydra_preempt.lightning import fit

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, _, _ = model_and_optimizer()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 100)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == WARM_UP:
                self.began = time.perf_counter()

        def on_train_end(self, trainer, *args) -> None:
            self.us = (time.perf_counter() - self.began) / (steps - WARM_UP) * 1e6

    clock = Clock()
    loader = DataLoader(dataset(), batch_size=4, shuffle=True)
    trainer = L.Trainer(barebones=True, max_steps=steps, accelerator="cpu", devices=1, max_epochs=-1, callbacks=[clock])
    if protocol:
        with tempfile.TemporaryDirectory() as run_dir:
            fit(trainer, Module(), loader, run_dir=run_dir, config={"progress": {"console": False}})
    else:
        trainer.fit(Module(), loader)
    return clock.us


def hf_trainer(steps: int, protocol: bool = False) -> float | None:
    """Hugging Face Trainer's loop alone (`protocol`: under hydra_preempt.transformers.train), timed from its
    100th step to its last, so that neither set-up is in the figure."""
    try:
        import transformers
    except ImportError:
        return None
    from hydra_preempt.transformers import train

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, _, _ = model_and_optimizer()

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.model(x), labels)}

    class Dicts(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.data = dataset()

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i):
            x, y = self.data[i]
            return {"x": x, "labels": y}

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs) -> None:
            if state.global_step == WARM_UP:
                self.began = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs) -> None:
            self.us = (time.perf_counter() - self.began) / (steps - WARM_UP) * 1e6

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=4,
            max_steps=steps,
            learning_rate=0.01,
            optim="sgd",
            lr_scheduler_type="constant",
            logging_steps=steps,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=Model(), args=args, train_dataset=Dicts(), callbacks=[clock])
        if protocol:
            train(trainer, run_dir=f"{out}/run", config={"progress": {"console": False}})
        else:
            trainer.train()
    return clock.us


WARM_UP = 100  # Lightning's and Trainer's steps before their clocks start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("hydra_preempt").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cases: dict[str, Callable[[int], float | None]] = {
        "plain loop": plain,
        "session": session_loop,
        "session, emergency off": lambda n: session_loop(n, emergency=False),
        "session, StatefulDataLoader": lambda n: session_loop(n, "stateful"),
        "session, 2 loaders": lambda n: session_loop(n, "two loaders"),
        "Lightning barebones": lightning_barebones,
        "Lightning barebones, fit()": lambda n: lightning_barebones(n, protocol=True),
        "HF Trainer": hf_trainer,
        "HF Trainer, train()": lambda n: hf_trainer(n, protocol=True),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():
            if (us := case(args.steps)) is not None:
                times[name].append(us)
    base = statistics.median(times["plain loop"])
    print(f"{args.steps} steps, medians of {args.repeats} interleaved repeats (min-max), us per step")
    print(f"{'case':30s} {'step':>8s} {'min-max':>13s} {'added':>7s} {'of 100 ms':>9s}")
    for name, values in times.items():
        if not values:
            print(f"{name:30s} {'-':>8s}  (not installed: pip install lightning transformers)")
            continue
        median = statistics.median(values)
        added = median - base
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"{name:30s} {median:8.0f} {spread:>13s} {added:+7.0f} {added / 1e3:8.2f}%")
    if times["Lightning barebones, fit()"]:
        added = statistics.median(times["Lightning barebones, fit()"]) - statistics.median(times["Lightning barebones"])
        print(f"fit() adds to Lightning's loop: {added:+.0f} us per step, {added / 1e3:.2f}% of a 100 ms step")
    if times["HF Trainer, train()"]:
        added = statistics.median(times["HF Trainer, train()"]) - statistics.median(times["HF Trainer"])
        print(f"train() adds to Trainer's loop: {added:+.0f} us per step, {added / 1e3:.2f}% of a 100 ms step")


if __name__ == "__main__":
    main()
