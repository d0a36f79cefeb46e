"""A run directory shared with other users (a group-writable project directory): a link planted at any
name the library writes is never followed. Another user can read a run's pid from .run.lock, so names
built from it (the old temporaries of atomic writes) are planted too."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from hydra_preempt import ExitCode, run
from hydra_preempt.checkpoint.retention import RetentionPolicy
from hydra_preempt.checkpoint.store import CheckpointStore

# Names a run writes into its run directory and checkpoint directory (PID: this process's id), planted
# before it starts; the temporaries of its atomic writes are planted while it runs, after its start
# removed what looked like the leftovers of an interrupted write, as the attacker of the report did.
WRITTEN = [
    "result.json",
    "run_log.jsonl",
    "metrics.jsonl",
    "gpu_metrics.jsonl",
    "checkpoints/index.json",
    "checkpoints/.write-probe.PID",
    "checkpoints/step-000000004",
]
TEMPORARIES = [".result.json.tmp-PID", "checkpoints/.index.json.tmp-PID"]


def train(session, plant_meanwhile=None):
    if plant_meanwhile is not None:
        plant_meanwhile()
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session.register(model=model, optimizer=optimizer)
    session.restore()
    for _ in session.steps(8):
        optimizer.zero_grad()
        model(torch.randn(4, 2)).sum().backward()
        optimizer.step()
        session.report(loss=1.0)
    return {"done": True}


def plant(tmp_path: Path, names: list[str], planted: dict | None = None) -> tuple[Path, dict[Path, Path]]:
    """A link at each of `names` in the run directory to a victim file outside it; (run dir, victims)."""
    run_dir, victims = tmp_path / "run", tmp_path / "victims"
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    victims.mkdir(exist_ok=True)
    planted = {} if planted is None else planted
    for name in names:
        victim = victims / name.replace("/", "_")
        victim.write_text("victim")
        link = run_dir / name.replace("PID", str(os.getpid()))
        link.symlink_to(victim)
        planted[link] = victim
    return run_dir, planted


def test_links_planted_at_every_name_a_run_writes_are_never_followed(tmp_path):
    run_dir, planted = plant(tmp_path, WRITTEN)
    outcome = run(
        lambda s: train(s, lambda: plant(tmp_path, TEMPORARIES, planted)), run_dir, {"checkpoint": {"every_steps": 4}}
    )
    assert len(planted) == len(WRITTEN) + len(TEMPORARIES)
    assert [v.name for v in planted.values() if v.read_text() != "victim"] == []
    assert outcome.exit_code == ExitCode.FINISHED, outcome.message
    result = run_dir / "result.json"
    assert stat.S_ISREG(result.lstat().st_mode)  # the rename replaced the link itself
    assert [p for p in run_dir.glob(".*.tmp-*") if p not in planted] == []  # no temporary of its own left


@pytest.mark.parametrize(
    "name, said",
    [
        (".run.lock", "is not usable: .run.lock is a symlink"),
        ("checkpoints/OWNER.json", "has an unreadable OWNER.json"),
    ],
)
def test_a_link_where_the_run_must_read_its_own_file_is_refused_in_one_line(tmp_path, name, said):
    run_dir, planted = plant(tmp_path, [name])
    outcome = run(train, run_dir, {"checkpoint": {"every_steps": 4}})
    assert outcome.exit_code == ExitCode.USAGE and said in outcome.message and "\n" not in outcome.message
    assert [v.read_text() for v in planted.values()] == ["victim"]


def test_a_checkpoint_in_progress_is_private_and_unpredictably_named(tmp_path):
    """Nobody else can plant a link inside it for a file to be written through (DCP's shards included)."""
    store = CheckpointStore(tmp_path, RetentionPolicy(keep_last=1))
    first, second = store.begin(7), store.begin(7)
    assert first != second and first.name.startswith(".tmp-step-000000007.")
    assert stat.S_IMODE(first.stat().st_mode) == 0o700


def test_a_link_at_a_checkpoints_name_is_no_checkpoint_and_the_save_is_made(tmp_path):
    """A link at step-N to another run's valid checkpoint of that step: the save is not skipped as
    'already on disk' (a preemption's save would have been lost), and the linked directory is untouched."""
    other = tmp_path / "other"
    assert run(train, other, {"checkpoint": {"every_steps": 4}}).exit_code == ExitCode.FINISHED
    linked = other / "checkpoints" / "step-000000004"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in linked.iterdir())
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000000004").symlink_to(linked)
    assert run(train, run_dir, {"checkpoint": {"every_steps": 4}}).exit_code == ExitCode.FINISHED
    saved = run_dir / "checkpoints" / "step-000000004"
    assert saved.is_dir() and not saved.is_symlink()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in linked.iterdir()) == before
