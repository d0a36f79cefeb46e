"""A Lightning program of 1 or 2 ranks for tests/e2e/test_lightning_slurm.py, run two ways:

    python -m tests.e2e.lightning_ddp RUN_DIR RANKS          under srun (one task a node): hydra_preempt.lightning.fit
    python -m tests.e2e.lightning_ddp RUN_DIR RANKS --plain  on this host: plain trainer.fit with devices=RANKS
                                                             (Lightning starts the second process), the reference
    python -m tests.e2e.lightning_ddp RUN_DIR RANKS --auto-requeue   under srun: plain trainer.fit with Lightning's
                                                             SLURMEnvironment(auto_requeue=True) (benchmarks/
                                                             framework_requeue.py)

The same model, data and schedule as docs/lightning.md (random augmentation in 2 workers, dropout, AdamW with a
per-step one-cycle schedule, accumulation over 2 batches, a validation every 10 batches), DDP over gloo for 2; the final
parameters go to RUN_DIR/params.pt (rank 0), and each optimizer step's global step, as rank 0 makes it, is appended to
RUN_DIR/steps.log. STEP_SLEEP (seconds) slows each step, so that a preemption lands
mid-run."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from torch.utils.data import DataLoader, Dataset

from hydra_preempt.lightning import exit_with, fit


class Noisy(Dataset):
    def __init__(self, count: int, seed: int) -> None:
        self.x = torch.randn(count, 16, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + 0.01 * torch.randn(16)
        return x, x.sum(0, keepdim=True)


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, sync_dist=True)
        time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def train_dataloader(self):
        return DataLoader(Noisy(2048, seed=1), batch_size=32, shuffle=True, num_workers=2)

    def val_dataloader(self):
        return DataLoader(Noisy(256, seed=2), batch_size=64)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SaveParams(L.Callback):
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.step = 0

    def on_train_start(self, trainer, module) -> None:
        self.step = trainer.global_step  # where this start begins: 0, or the step it resumed from

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.is_global_zero and trainer.global_step != self.step:
            self.step = trainer.global_step
            with open(self.run_dir / "steps.log", "a") as log:
                log.write(f"{self.step}\n")

    def on_fit_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, self.run_dir / "params.pt")


def main() -> None:
    run_dir, ranks, plain = Path(sys.argv[1]), int(sys.argv[2]), "--plain" in sys.argv
    auto_requeue = "--auto-requeue" in sys.argv
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=3,
        accumulate_grad_batches=2,
        val_check_interval=10,
        callbacks=[SaveParams(run_dir)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        strategy="ddp" if ranks > 1 else "auto",
        devices=ranks if plain else 1,
        num_nodes=1 if plain else ranks,
        default_root_dir=run_dir,
        plugins=[SLURMEnvironment(auto_requeue=True)] if auto_requeue else None,
    )
    if plain or auto_requeue:
        trainer.fit(Regressor())
    else:
        exit_with(fit(trainer, Regressor(), run_dir=run_dir))


if __name__ == "__main__":
    main()
