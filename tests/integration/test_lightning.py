"""hydra_preempt.lightning: the Lightning program of docs/lightning.md, as written there, stopped twice by
SIGTERM to its whole process group (its DataLoader workers get it too, as from slurmstepd) and started
again, ends as an uninterrupted run: the same parameters, the same metrics at every step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hydra_preempt import ExitCode
from hydra_preempt.checkpoint.export import export_weights
from hydra_preempt.rundir import read_events
from tools.train_process import newest_checkpoint, run_stopper, sweep_stopped_once

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "lightning.md").read_text(), re.S)
PROGRAM = next(b for b in BLOCKS if "from hydra_preempt.lightning import" in b)

# The program as written, with one callback added to its Trainer: at the end of the batch that makes
# optimizer step STOP_AT, SIGTERM to the process group from another process, as from slurmstepd (the
# session's boundary there takes the stop).
STOPPER = """
import os, runpy, subprocess, sys
import lightning as L

class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            self.step = None
            assert os.getpgrp() == os.getpid(), "not a process group of its own"
            subprocess.run(["kill", "-TERM", "--", f"-{os.getpgrp()}"], check=True, start_new_session=True)

made = L.Trainer.__init__

def with_stop(self, *args, callbacks=(), **kwargs):
    made(self, *args, callbacks=[*callbacks, StopAt(int(sys.argv[1]))], **kwargs)

L.Trainer.__init__ = with_stop
runpy.run_path("train.py", run_name="__main__")
"""


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return newest_checkpoint(run_dir)["objects"]["lightning"]["state_dict"]


def uninterrupted_and_stopped(tmp_path: Path, program: str, stops: list[int]) -> dict[str, Path]:
    """The run directories of `program` run uninterrupted and stopped at each of `stops` then finished."""
    runs = {}
    for name, stop_points in (("uninterrupted", []), ("stopped", stops)):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "train.py").write_text(program)
        (directory / "stopper.py").write_text(STOPPER)
        for stop_at in stop_points:
            done = run_stopper(directory, stop_at)
            assert done.returncode == ExitCode.REQUEUE, done.stderr[-3000:]
        done = run_stopper(directory, -1)
        assert done.returncode == ExitCode.FINISHED, done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        runs[name] = directory / "runs" / "lightning"
    return runs


def assert_same_parameters(runs: dict[str, Path], name: str = "stopped") -> None:
    expected, got = final_parameters(runs["uninterrupted"]), final_parameters(runs[name])
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


# The same program through a door: its module and Trainer in a Hydra app's training function,
# `train(session, trainer, ...)`, swept with hydra/launcher=preempt_local (a submitit job process).
# At step STOP_AT of the job's first start, SIGTERM to the job's process and its DataLoader workers,
# sent from another process, as slurmstepd signals every process of a job step.
HYDRA_APP = """
import os, subprocess, sys
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from hydra_preempt import run_hydra_app
from hydra_preempt.lightning import train
from program import Data, Regressor

STOP_AT, STOPPED = 27, Path(__file__).parent / "stopped"


class StopOnce(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == STOP_AT and not STOPPED.exists():
            STOPPED.touch()
            workers = [p.parent.name for p in Path("/proc").glob("[0-9]*/stat")
                       if p.read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
            subprocess.run(["kill", "-TERM", str(os.getpid()), *workers], check=True)


def lightning_app(session, cfg):
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=3,
        accumulate_grad_batches=2,
        val_check_interval=20,
        callbacks=[ModelCheckpoint(monitor="val_loss"), EarlyStopping("val_loss", patience=20), StopOnce()],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=session.run_dir / "lightning",
    )
    return train(session, trainer, Regressor(), datamodule=Data())


@hydra.main(version_base="1.3", config_path=None)
def main(cfg):
    return run_hydra_app(lightning_app, cfg)


if __name__ == "__main__":
    main()
"""


def test_a_lightning_program_stopped_twice_by_its_process_group_ends_as_an_uninterrupted_run(tmp_path):
    runs = uninterrupted_and_stopped(tmp_path, PROGRAM, [20, 32])
    history = [e for e in read_events(runs["stopped"]) if e["event"] == "stop"]
    # 20: a validation follows that step, the stop waits for its end; 32: an epoch's last, taken at 33
    assert [(e["reason"], e["step"], e["checkpoint_step"]) for e in history] == [
        ("preempted", 20, 20),
        ("preempted", 33, 33),
        ("finished", 96, 96),
    ]
    assert [e["resumed_from"] for e in history] == [None, 20, 33]
    metrics = {name: (run / "metrics.jsonl").read_text().splitlines() for name, run in runs.items()}
    assert metrics["stopped"] == metrics["uninterrupted"]
    assert {"loss", "val_loss"} <= json.loads(metrics["stopped"][-1]).keys()
    assert_same_parameters(runs)

    again = run_stopper(tmp_path / "stopped", -1)  # a finished run started again: nothing more
    assert again.returncode == ExitCode.FINISHED, again.stderr[-3000:]
    assert (runs["stopped"] / "metrics.jsonl").read_text().splitlines() == metrics["stopped"]
    results = {name: json.loads((run / "result.json").read_text()) for name, run in runs.items()}
    assert results["stopped"] == results["uninterrupted"] and {"loss", "val_loss"} <= results["stopped"].keys()
    # the module's weights out of Lightning's checkpoint, by default
    step, _, name = export_weights(runs["stopped"], tmp_path / "model.safetensors")
    assert (step, name) == (96, "lightning.state_dict")
    exported, expected = load_file(tmp_path / "model.safetensors"), final_parameters(runs["uninterrupted"])
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)

    runs["door"] = sweep_stopped_once(tmp_path / "door", {"program.py": PROGRAM, "app.py": HYDRA_APP})
    history = [e for e in read_events(runs["door"]) if e["event"] == "stop"]
    assert [(e["reason"], e["step"], e["resumed_from"]) for e in history] == [
        ("preempted", 27, None),
        ("finished", 96, 27),
    ]
    assert (runs["door"] / "metrics.jsonl").read_text().splitlines() == metrics["uninterrupted"]
    assert_same_parameters(runs, "door")


def test_persistent_validation_workers_leave_a_resumed_training_exact(tmp_path):
    """The saved run made them at its sanity check (the global generator then left as it was); the resumed
    one, which has no sanity check, makes them at its first validation: without a draw either. Training
    is exact; random draws inside those workers are not positioned (the validation's own noise differs)."""
    val_loader = "DataLoader(Noisy(256, seed=2), batch_size=64)"
    assert val_loader in PROGRAM
    program = PROGRAM.replace(val_loader, val_loader[:-1] + ", num_workers=2, persistent_workers=True)")
    runs = uninterrupted_and_stopped(tmp_path, program, [25])
    losses = {
        name: [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]
        for name, run in runs.items()
    }
    assert losses["stopped"] == losses["uninterrupted"]
    assert_same_parameters(runs)


def test_a_planted_checkpoint_cannot_name_files_out_of_model_checkpoints_directory(tmp_path):
    """Lightning deletes the files a ModelCheckpoint's state names (a k-th best replaced): a checkpoint
    edited and signed again must not make it delete anything out of the callback's directory."""
    from hydra_preempt.lightning import _confined

    root = tmp_path / "ckpts"
    inside, outside = str(root / "epoch=0.ckpt"), str(root / ".." / ".." / "victim")
    state = {"dirpath": str(root), "best_model_path": inside, "kth_best_model_path": outside, "best_k_models": {}}
    state["best_k_models"] = {inside: torch.tensor(1.0), outside: torch.tensor(2.0)}
    kept = _confined("ModelCheckpoint", state)
    assert kept["best_model_path"] == "" and kept["kth_best_model_path"] == ""
    assert list(kept["best_k_models"]) == [inside]
    fine = {**state, "kth_best_model_path": inside, "best_k_models": {inside: torch.tensor(1.0)}}
    assert _confined("ModelCheckpoint", fine) is fine


def refused(tmp_path: Path, train_data, **trainer_args) -> str:
    """fit() of a one-layer module whose train_dataloader() returns `train_data()`: its refusal's message."""
    import lightning as L

    from hydra_preempt.lightning import fit

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def train_dataloader(self):
            return train_data()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    outcome = fit(L.Trainer(max_epochs=1, **options, **trainer_args), Model(), run_dir=tmp_path / "run")
    assert outcome.exit_code == ExitCode.USAGE, outcome.message
    return outcome.message


def test_training_data_that_is_not_a_data_loader_is_refused_in_one_line(tmp_path):
    generator = lambda: (torch.ones(4, 2) for _ in range(3))  # noqa: E731 (a restart would start it over)
    assert "the training data is a generator, not a DataLoader" in refused(tmp_path, generator)


def test_a_limit_on_a_training_loader_without_a_length_is_refused_in_one_line(tmp_path):
    """Lightning prefetches a loader without a length and stops it at limit_train_batches with a batch
    taken beyond the limit: a hostile review measured a resumed run that differed from its first step."""

    class Endless(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(range(8))

    loader = lambda: torch.utils.data.DataLoader(torch.ones(8, 2), batch_size=2, sampler=Endless())  # noqa: E731
    said = "limit_train_batches with a training loader that has no length is not resumed exactly"
    assert said in refused(tmp_path, loader, limit_train_batches=2)


def test_a_checkpoint_of_another_module_is_named_before_anything_is_loaded():
    """Lightning would load a float64 checkpoint into a float32 module cast, silently: no exact resume."""
    import lightning as L

    from hydra_preempt.lightning import _TrainerState

    class Module(L.LightningModule):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, width)

    def checkpoint(module):
        return {"loops": {"fit_loop": {}}, "state_dict": module.state_dict()}

    state = _TrainerState(None, Module(2))
    assert state.check_state_dict(checkpoint(Module(2))) == []
    assert state.check_state_dict(checkpoint(Module(3))) == [
        "state_dict.net.bias: shape (3,) in the checkpoint, (2,) in this model",
        "state_dict.net.weight: shape (3, 4) in the checkpoint, (2, 4) in this model",
    ]
    [problem] = state.check_state_dict(checkpoint(Module(2).double()))
    assert problem.startswith("another dtype (checkpoint.cast_dtype: true loads them cast): state_dict.net.bias")
    assert _TrainerState(None, Module(2), cast=True).check_state_dict(checkpoint(Module(2).double())) == []
    assert state.check_state_dict({"state_dict": {}}) == [
        "the checkpoint holds no Lightning checkpoint (state_dict, loops)"
    ]
