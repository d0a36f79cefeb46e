"""A template of your own Hydra app, preemption-safe: copy this folder and replace the model and data.

    python app.py hydra.run.dir=runs/a                   # kill -TERM it, run it again: it continues
    python app.py -m hydra/launcher=preempt_slurm hydra.launcher.qos=preemptible optim.lr=1e-3,1e-2

The config's session sections (checkpoint, divergence, signals, watchdog, ...) go to hydra_preempt;
a bad value there (or in `model`/`optim`/`trainer`, checked by RULES) ends the program with one line
and exit code 2 before anything runs.
"""

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from hydra_preempt import run_hydra_app
from hydra_preempt.config import Rule

POSITIVE = Rule(int, "a positive integer", lambda v: v > 0)
RULES = {  # every key of the app's own sections; the session's are checked by hydra_preempt
    "trainer.epochs": POSITIVE,
    "trainer.batch_size": POSITIVE,
    "model.hidden": POSITIVE,
    "optim.lr": Rule(float, "a number > 0", lambda v: v > 0),
}


def train(session, cfg: DictConfig) -> dict:
    torch.manual_seed(0)
    inputs = torch.randn(2048, 16, generator=torch.Generator().manual_seed(1))
    dataset = TensorDataset(inputs, inputs.sum(1, keepdim=True))
    loader = DataLoader(dataset, batch_size=cfg.trainer.batch_size, shuffle=True)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, cfg.model.hidden), torch.nn.GELU(), torch.nn.Linear(cfg.model.hidden, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    session.register(model=model, optimizer=optimizer, data=loader)
    session.restore()
    for _epoch in session.epochs(cfg.trainer.epochs):
        for x, y in session.batches(loader):
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.report(loss=loss.item())
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(inputs), inputs.sum(1, keepdim=True)).item()
    return {"loss": final, "step": session.step}  # RUN_DIR/result.json


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    return run_hydra_app(train, cfg, RULES)


if __name__ == "__main__":
    main()
