"""Every ```python block of the README and of docs/ (but docs/index.md, the README's copy) is executed here,
as written:

- a complete program (it starts with an import) runs from a fresh directory; one that trains through
  `run()` runs twice, and the second start of the finished run resumes, does nothing and finishes again;
- the porting pair ("Your own training script"): the script after ends with the loss of the script
  before to the last bit, uninterrupted and when stopped by SIGTERM twice mid-epoch;
- the submitit programs (they need a SLURM cluster with GPUs): compiled, and every name they use is
  imported or assigned in them; tests/e2e runs the same calls on the test cluster;
- the Snakefile (it includes the packaged workflow as a module): tests/integration/test_snakemake_local.py
  runs it as a project's Snakefile;
- the fragment of a training function (W&B and TensorBoard across requeues) runs through `run()`, twice,
  with stand-ins for `wandb` and `SummaryWriter` (not installed here); the session calls in it are real.
"""

from __future__ import annotations

import builtins
import os
import re
import runpy
import signal
import subprocess
import symtable
import sys
import types
from pathlib import Path

import pytest

from hydra_preempt import ExitCode, run

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "index.md")]
BLOCKS = [b for page in PAGES for b in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]
# the Lightning and Trainer programs run in tests/integration/test_lightning.py and test_transformers.py,
# stopped and resumed
LIGHTNING = [
    b for b in BLOCKS if "from hydra_preempt.lightning import" in b or "from hydra_preempt.transformers import" in b
]
PROGRAMS = [b for b in BLOCKS if b.startswith("import") and b not in LIGHTNING]
CLUSTER_PROGRAMS = [b for b in BLOCKS if b.startswith("from hydra_preempt import PreemptibleTask")]
SNAKEFILES = [b for b in BLOCKS if "\nmodule preempt:" in b]
FRAGMENTS = [b for b in BLOCKS if b.startswith("def train(session):")]
BEFORE, AFTER = (next(p for p in PROGRAMS if "ACCUMULATE" in p and ("run(" in p) == after) for after in (False, True))


def test_every_python_block_is_a_program_a_snakefile_or_an_executed_fragment():
    known = PROGRAMS + CLUSTER_PROGRAMS + SNAKEFILES + FRAGMENTS + LIGHTNING
    assert len(known) == len(BLOCKS), [b[:60] for b in BLOCKS if b not in known]
    assert CLUSTER_PROGRAMS and len(SNAKEFILES) == len(FRAGMENTS) == 1


@pytest.mark.parametrize("program", CLUSTER_PROGRAMS, ids=[f"cluster{i}" for i in range(len(CLUSTER_PROGRAMS))])
def test_a_cluster_program_uses_no_undefined_name(program):
    table = symtable.symtable(program, "submitit program", "exec")
    undefined = [
        s.get_name()
        for s in table.get_symbols()
        if s.is_referenced() and not (s.is_imported() or s.is_assigned()) and not hasattr(builtins, s.get_name())
    ]
    assert not undefined, undefined


@pytest.mark.slow
@pytest.mark.parametrize("program", PROGRAMS, ids=[f"program{i}" for i in range(len(PROGRAMS))])
def test_a_readme_program_runs_and_a_finished_run_resumes(tmp_path, program):
    script = tmp_path / "example.py"
    script.write_text(program)
    starts = ("first", "again") if "run(" in program else ("only",)
    for start in starts:
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{start} start:\n{done.stderr[-3000:]}"
    if len(starts) == 2:
        assert "[hydra_preempt] resumed from" in done.stderr and "finished at step" in done.stderr


def stopping_at(train, steps: set[int]):
    """The training function, sent SIGTERM (the session's handler) at the last batch of each step in `steps`."""

    class Stopping:
        def __init__(self, session) -> None:
            self._session = session

        def __getattr__(self, name):
            return getattr(self._session, name)

        def batches(self, loader, every=1):
            for batch in self._session.batches(loader, every):
                if self._session.step in steps and self._session.update_due:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    return lambda session: train(Stopping(session))


@pytest.mark.slow
def test_the_ported_script_ends_as_the_script_before_also_when_stopped_mid_epoch(tmp_path):
    (tmp_path / "before.py").write_text(BEFORE)
    done = subprocess.run([sys.executable, "before.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before_loss = float(done.stdout.split("final loss")[1])
    (tmp_path / "after.py").write_text(AFTER)
    train = runpy.run_path(str(tmp_path / "after.py"))["train"]  # not __main__: defines, does not run
    config = {"checkpoint": {"every_steps": 20}}
    whole = run(train, tmp_path / "whole", config)
    assert whole.exit_code == ExitCode.FINISHED and whole.result["loss"] == before_loss
    for stop in (7, 45):  # mid-epoch (16 steps an epoch), between periodic checkpoints
        assert run(stopping_at(train, {stop}), tmp_path / "stopped", config).exit_code == ExitCode.REQUEUE
    resumed = run(train, tmp_path / "stopped", config)
    assert resumed.exit_code == ExitCode.FINISHED and resumed.result["loss"] == before_loss


@pytest.mark.slow
def test_the_wandb_fragment_runs_with_stand_ins_for_wandb_and_tensorboard(tmp_path):
    calls: list[tuple] = []
    wandb = types.SimpleNamespace(init=lambda **kw: calls.append(("wandb.init", kw)))
    scope = {
        "wandb": wandb,
        "SummaryWriter": lambda log_dir, purge_step: calls.append(("SummaryWriter", purge_step)),
        "log_dir": str(tmp_path / "tb"),
        "max_steps": 3,
    }
    exec(compile(FRAGMENTS[0], "README fragment", "exec"), scope)
    for _ in range(2):
        assert run(scope["train"], tmp_path / "run").exit_code == ExitCode.FINISHED
    first, second = calls[:2], calls[2:]
    assert first[0][1]["id"] == second[0][1]["id"] and first[0][1]["resume"] == "allow"
    assert (first[1], second[1]) == (("SummaryWriter", 0), ("SummaryWriter", 3))
