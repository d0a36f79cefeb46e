"""The Trainer program of docs/transformers.md, as written there, for tests/e2e/test_transformers_slurm.py and
benchmarks/framework_requeue.py, run in WORK (it trains into WORK/runs/hf) one of three ways:

    python -m tests.e2e.trainer_program WORK            hydra_preempt.transformers.train, as the docs say
    python -m tests.e2e.trainer_program WORK --plain    plain trainer.train(): the uninterrupted reference
    python -m tests.e2e.trainer_program WORK --jit      plain trainer.train() with Trainer's own SIGTERM handling
                                                        (enable_jit_checkpoint) and its own resume
                                                        (resume_from_checkpoint=True once a checkpoint exists)

each as 1 process, or as several under torchrun (`hydra-preempt torchrun ... -m tests.e2e.trainer_program`).
One callback is added to the program's Trainer: each optimizer step's global step, as rank 0 makes it, is
appended to WORK/steps.log, STEP_SLEEP (seconds) slows each step so that a preemption lands mid-run, and the
final parameters of a finished run go to WORK/params.pt (rank 0): as tests/e2e/lightning_ddp.py writes them."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.trainer_utils import get_last_checkpoint

import hydra_preempt.transformers

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "transformers.md").read_text(), re.S)
PROGRAM = next(b for b in BLOCKS if "from hydra_preempt.transformers import" in b)


class Steps(transformers.TrainerCallback):
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.pause = float(os.environ.get("STEP_SLEEP", "0"))

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with open(self.run_dir / "steps.log", "a") as log:
                log.write(f"{state.global_step}\n")
        time.sleep(self.pause)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and state.global_step == state.max_steps:  # not after a JIT stop
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, self.run_dir / "params.pt")


def plain_train(trainer: transformers.Trainer, *, run_dir: str, **_) -> None:
    """trainer.train() where the program calls train(); with Trainer's own SIGTERM handling, resumed by
    Trainer from its newest checkpoint in output_dir."""
    if trainer.args.enable_jit_checkpoint and os.path.isdir(trainer.args.output_dir):
        trainer.train(resume_from_checkpoint=get_last_checkpoint(trainer.args.output_dir))
    else:
        trainer.train()


def main() -> None:
    work, way = Path(sys.argv[1]), (sys.argv[2:] or ["--train"])[0]
    os.chdir(work)
    made = transformers.Trainer.__init__

    def with_steps(self, *args, callbacks=None, **kwargs):
        if way == "--jit":
            kwargs["args"].enable_jit_checkpoint = True  # read by __init__, which adds Trainer's own handler
        made(self, *args, callbacks=[*(callbacks or []), Steps(work)], **kwargs)

    transformers.Trainer.__init__ = with_steps
    if way in ("--plain", "--jit"):
        hydra_preempt.transformers.train = plain_train  # type: ignore[assignment]
        hydra_preempt.transformers.exit_with = lambda outcome: None  # type: ignore[assignment]
    exec(compile(PROGRAM, str(work / "train.py"), "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()
