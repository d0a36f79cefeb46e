"""hydra_preempt.transformers: the Trainer program of docs/transformers.md, as written there, stopped twice
by SIGTERM to its whole process group (its DataLoader workers get it too, as from slurmstepd) and started
again, ends as an uninterrupted run: the same parameters, the same logged values at every step, the same
final training loss."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hydra_preempt import ExitCode
from hydra_preempt.rundir import read_events
from tools.train_process import newest_checkpoint, run_stopper, signal_group, sweep_stopped_once

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "transformers.md").read_text(), re.S)
PROGRAM = next(b for b in BLOCKS if "from hydra_preempt.transformers import" in b)

# The program as written, with one callback added to its Trainer: at the end of optimizer step STOP_AT,
# SIGTERM to the process group from another process, as from slurmstepd (the session's boundary after
# that step's logging and evaluation takes the stop); `stopper.py STOP_AT hang`: that step hangs instead,
# under a watchdog of 10 s.
STOPPER = """
import os, runpy, subprocess, sys, time
import transformers
import hydra_preempt.transformers

class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.step = None
            if sys.argv[2:] == ["hang"]:
                time.sleep(3600)  # the watchdog ends the process
            assert os.getpgrp() == os.getpid(), "not a process group of its own"
            subprocess.run(["kill", "-TERM", "--", f"-{os.getpgrp()}"], check=True, start_new_session=True)

if sys.argv[2:] == ["hang"]:
    plain_train = hydra_preempt.transformers.train
    hydra_preempt.transformers.train = lambda trainer, **kw: plain_train(trainer, config={"watchdog": {"timeout_s": 10}}, **kw)

made = transformers.Trainer.__init__

def with_stop(self, *args, callbacks=None, **kwargs):
    made(self, *args, callbacks=[*(callbacks or []), StopAt(int(sys.argv[1]))], **kwargs)

transformers.Trainer.__init__ = with_stop
runpy.run_path("train.py", run_name="__main__")
"""


# The same program through a door: its Trainer, made as the program makes it, in a Hydra app's training
# function, `train_in(session, trainer)`, swept with hydra/launcher=preempt_local (a submitit job
# process). At step STOP_AT of the job's first start, SIGTERM to the job's process and its DataLoader
# workers, sent from another process, as slurmstepd signals every process of a job step.
HYDRA_APP = """
import os, runpy, subprocess
from pathlib import Path

import hydra
import transformers

import hydra_preempt.transformers
from hydra_preempt import run_hydra_app

STOP_AT, HERE = 27, Path(__file__).parent


class StopOnce(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == STOP_AT and not (HERE / "stopped").exists():
            (HERE / "stopped").touch()
            workers = [p.parent.name for p in Path("/proc").glob("[0-9]*/stat")
                       if p.read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
            subprocess.run(["kill", "-TERM", str(os.getpid()), *workers], check=True)


def made_by_the_program():
    made = []
    hydra_preempt.transformers.train = lambda trainer, **_: made.append(trainer)
    hydra_preempt.transformers.exit_with = lambda outcome: None
    runpy.run_path(str(HERE / "train.py"), run_name="__main__")
    return made[0]


def trainer_app(session, cfg):
    trainer = made_by_the_program()
    trainer.add_callback(StopOnce())
    return hydra_preempt.transformers.train_in(session, trainer)


@hydra.main(version_base="1.3", config_path=None)
def main(cfg):
    return run_hydra_app(trainer_app, cfg)


if __name__ == "__main__":
    main()
"""


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return newest_checkpoint(run_dir)["objects"]["transformers"]["model"]


def test_a_trainer_program_stopped_twice_by_its_process_group_ends_as_an_uninterrupted_run(tmp_path):
    runs = {}
    for name, stops in (("uninterrupted", []), ("stopped", [20, 26, 32])):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "train.py").write_text(PROGRAM)
        (directory / "stopper.py").write_text(STOPPER)
        for stop_at in stops:
            hang = stop_at == 26  # the watchdog ends it: resumed from 20, steps 21-25 made again
            done = run_stopper(directory, stop_at, *(["hang"] if hang else []))
            assert done.returncode == (ExitCode.HANG if hang else ExitCode.REQUEUE), done.stderr[-3000:]
            if stop_at == 32:  # an epoch's end: Trainer would count the epochs done from the step
                refused_when_accumulation_changes(directory)
        done = run_stopper(directory, -1)
        assert done.returncode == ExitCode.FINISHED and "Traceback" not in done.stderr, done.stderr[-3000:]
        runs[name] = directory / "runs" / "hf"
    metrics_before = (runs["stopped"] / "metrics.jsonl").read_text()
    again = run_stopper(tmp_path / "stopped", -1)  # a finished run started again: nothing more
    assert again.returncode == ExitCode.FINISHED, again.stderr[-3000:]
    assert (runs["stopped"] / "metrics.jsonl").read_text() == metrics_before

    # 20: an evaluation follows that step, the stop comes after it; a hang at step 26's end (a callback:
    # the last boundary was 25's), resumed from 20;
    # 32: an epoch's last step; then the start refused (another accumulation), the last start and the one
    # after the finish
    history = [e for e in read_events(runs["stopped"]) if e["event"] == "stop"]
    assert [(e["reason"], e["step"], e["checkpoint_step"], e["resumed_from"]) for e in history] == [
        ("preempted", 20, 20, None),
        ("hang", 25, 20, 20),
        ("preempted", 32, 32, 20),
        ("failed", 32, 32, 32),
        ("finished", 48, 48, 32),
        ("finished", 48, 48, 48),
    ]
    metrics = {name: (run / "metrics.jsonl").read_text().splitlines() for name, run in runs.items()}
    assert metrics["stopped"] == metrics["uninterrupted"] and len(metrics["stopped"]) == 48
    assert {"loss", "grad_norm", "learning_rate", "eval_loss"} <= json.loads(metrics["stopped"][19]).keys()
    results = {name: json.loads((run / "result.json").read_text()) for name, run in runs.items()}
    assert results["stopped"] == results["uninterrupted"] and "train_loss" in results["stopped"]
    expected, got = final_parameters(runs["uninterrupted"]), final_parameters(runs["stopped"])
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    door = sweep_stopped_once(tmp_path / "door", {"train.py": PROGRAM, "app.py": HYDRA_APP})
    history = [e for e in read_events(door) if e["event"] == "stop"]
    assert [(e["reason"], e["step"], e["resumed_from"]) for e in history] == [
        ("preempted", 27, None),
        ("finished", 48, 27),
    ]
    assert (door / "metrics.jsonl").read_text().splitlines() == metrics["uninterrupted"]
    got = final_parameters(door)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def refused_when_accumulation_changes(directory: Path) -> None:
    program = (directory / "train.py").read_text()
    changed = program.replace("gradient_accumulation_steps=2", "gradient_accumulation_steps=4")
    (directory / "train.py").write_text(changed)
    done = run_stopper(directory, -1)
    (directory / "train.py").write_text(program)
    assert done.returncode == ExitCode.USAGE and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "the checkpoint's run is another: gradient_accumulation_steps 2 -> 4, max_steps 48 -> 24" in done.stderr


@pytest.mark.parametrize(
    "setting, said",
    [
        ({"ignore_data_skip": True}, "args.ignore_data_skip is not resumed exactly"),
        ({"auto_find_batch_size": True}, "args.auto_find_batch_size is not resumed exactly"),
    ],
)
def test_what_is_not_resumed_exactly_is_refused_in_one_line(tmp_path, setting, said):
    from transformers import Trainer, TrainingArguments

    from hydra_preempt.transformers import train

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], **setting)
    trainer = Trainer(
        model=torch.nn.Linear(2, 1), args=args, train_dataset=torch.utils.data.TensorDataset(torch.ones(4, 2))
    )
    outcome = train(trainer, run_dir=tmp_path / "run")
    assert outcome.exit_code == ExitCode.USAGE and said in outcome.message, outcome.message
    assert not (tmp_path / "run" / "checkpoints").exists() or not list(
        (tmp_path / "run" / "checkpoints").glob("step-*")
    )


def test_a_trainer_of_one_process_in_each_task_of_an_srun_step_is_refused(tmp_path, monkeypatch):
    """`srun python train.py` with 2 tasks and no torchrun: Trainer reads torchrun's variables, so each task
    would train alone on all the data, not as one of a group; refused in one line."""
    from transformers import Trainer, TrainingArguments

    from hydra_preempt.errors import ConfigError
    from hydra_preempt.transformers import _refuse_unsupported

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    trainer = Trainer(
        model=torch.nn.Linear(2, 1), args=args, train_dataset=torch.utils.data.TensorDataset(torch.ones(4, 2))
    )
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    with pytest.raises(ConfigError, match=r"runs as 1 process\(es\) in each task of an srun step of 2: start it with"):
        _refuse_unsupported(trainer)
    monkeypatch.setenv("RANK", "0")  # left over in the environment, no launcher: refused all the same
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"in each task of an srun step of 2"):
        _refuse_unsupported(trainer)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # torchrun in one task: its group
    _refuse_unsupported(trainer)


def test_two_ranks_under_torchrun_stopped_mid_epoch_end_as_an_uninterrupted_run(tmp_path):
    """The same program as 2 processes (DDP over gloo, each its shard and its 2 workers) under `hydra-preempt
    torchrun`: SIGTERM to the agent's process group (slurmstepd's with proctrack/pgid) once step 10 of 24
    (8 an epoch) is logged; both ranks stop at one boundary, and the restart ends as an uninterrupted run."""
    runs = {}
    for name, stop_after in (("uninterrupted", None), ("stopped", 10)):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "train.py").write_text(PROGRAM)
        runs[name] = directory / "runs" / "hf"
        for stop in (stop_after, None) if stop_after else (None,):
            code, err = run_torchrun(directory, runs[name], stop)
            assert code == (ExitCode.REQUEUE if stop else ExitCode.FINISHED), err[-3000:]
    history = [e for e in read_events(runs["stopped"]) if e["event"] == "stop"]
    assert [e["reason"] for e in history] == ["preempted", "finished"] and 10 <= history[0]["step"] < 24
    assert history[1]["resumed_from"] == history[0]["checkpoint_step"] == history[0]["step"]
    metrics = {name: (run / "metrics.jsonl").read_text().splitlines() for name, run in runs.items()}
    assert metrics["stopped"] == metrics["uninterrupted"] and len(metrics["stopped"]) == 24
    expected, got = final_parameters(runs["uninterrupted"]), final_parameters(runs["stopped"])
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def run_torchrun(directory: Path, run_dir: Path, stop_after: int | None) -> tuple[int, str]:
    """`hydra-preempt torchrun --nproc-per-node 2 train.py` in `directory`; with `stop_after`, SIGTERM to its
    process group once RUN_DIR/metrics.jsonl has that step. Its exit code and output."""
    cmd = [sys.executable, "-m", "hydra_preempt.cli", "torchrun", "--nproc-per-node", "2", "train.py"]
    proc = subprocess.Popen(
        cmd, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    metrics = run_dir / "metrics.jsonl"

    def logged() -> int:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return json.loads(lines[-1])["step"] if lines else 0

    if stop_after is not None:
        while proc.poll() is None and logged() < stop_after:
            time.sleep(0.05)
        signal_group(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out
