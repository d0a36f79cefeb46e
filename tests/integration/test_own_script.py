"""A researcher's own script: standard data loaders in an epoch loop, early stops, long phases, output.

In-process runs stopped by real signals (the session's handlers, as in
test_session.py) for every kind of loader; real processes for what a plain
script shows and for the watchdog.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from hydra_preempt import ExitCode, SessionConfig, Status, run
from hydra_preempt.errors import ConfigError
from tests.integration.own_script import Augmented  # noise from every global generator in __getitem__
from tools.train_process import run_signalled, signal_group, signal_like_slurmstepd

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3


@pytest.fixture(autouse=True)
def no_worker_outlives_its_test():
    """DataLoader workers a test leaves (an iterator in a reference cycle, persistent workers of a
    loader used outside a run) would be signalled by the next test's signal_like_slurmstepd, unshielded,
    and torch's SIGCHLD handler would raise their death into that test's run."""
    before = set(multiprocessing.active_children())
    yield
    gc.collect()  # an iterator freed now shuts its workers down itself
    for child in set(multiprocessing.active_children()) - before:
        child.terminate()  # its parent's SIGTERM: a DataLoader worker exits 0
        child.join(5)


def make_loader(kind: str, dataset: TensorDataset, workers: int):
    common = {"num_workers": workers}
    if kind == "shuffle":
        return DataLoader(dataset, batch_size=32, shuffle=True, **common)
    if kind == "shuffle_generator":
        return DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5), **common)
    if kind == "sampler_generator":  # a sampler with a generator of its own, the loader's another
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(6))
        return DataLoader(dataset, batch_size=32, sampler=sampler, generator=torch.Generator().manual_seed(7), **common)
    if kind == "sequential":
        return DataLoader(dataset, batch_size=32, **common)
    if kind == "batch_sampler":
        return DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(dataset), 24, drop_last=False), **common)
    if kind == "drop_last":
        return DataLoader(dataset, batch_size=32, shuffle=True, drop_last=True, **common)
    if kind == "distributed":  # one rank of one here; two real ranks: test_multi_rank.py
        return DataLoader(dataset, batch_size=32, sampler=DistributedSampler(dataset, 1, 0, seed=3), **common)
    if kind == "persistent":
        return DataLoader(dataset, batch_size=32, shuffle=True, persistent_workers=True, **common)
    if kind == "python_random":  # a custom sampler that shuffles with Python's global generator
        return DataLoader(dataset, batch_size=32, sampler=PythonShuffle(len(dataset)), **common)
    if kind == "own_generators":  # samplers with generators of their own, under names of their own
        return DataLoader(dataset, batch_sampler=OwnRandomBatches(NumpyShuffle(len(dataset)), 24), **common)
    if kind == "torch_generator_elsewhere":
        return DataLoader(dataset, batch_size=32, sampler=TorchShuffle(len(dataset)), **common)
    if kind.startswith("augment"):  # random augmentation inside the workers, as vision pipelines do
        persistent, init = kind == "augment_persistent", seed_numpy_from_torch if kind == "augment_init" else None
        return DataLoader(
            Augmented(dataset),
            batch_size=32,
            shuffle=True,
            persistent_workers=persistent and workers > 0,
            worker_init_fn=init,
            collate_fn=jittered,
            **common,
        )
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, batch_size=32, shuffle=True, **common)
    if kind.startswith("stateful_"):  # samplers that draw from the global generators and have no state
        from torchdata.stateful_dataloader import StatefulDataLoader

        if kind == "stateful_random_generator":  # torch's RandomSampler draws from its generator at its end too
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(3))
            return StatefulDataLoader(dataset, batch_size=32, sampler=sampler, **common)
        weights = torch.linspace(1, 2, len(dataset))
        sampler = (
            PythonShuffle(len(dataset))
            if kind == "stateful_python_random"
            else WeightedRandomSampler(weights, len(dataset))
        )
        return StatefulDataLoader(dataset, batch_size=32, sampler=sampler, **common)
    raise ValueError(kind)


def jittered(samples):
    """A collate_fn that draws too (mixup-like)."""
    x, y = torch.utils.data.default_collate(samples)
    return x * (1 + 0.01 * torch.rand(1)), y


def seed_numpy_from_torch(worker_id: int) -> None:
    """torch's documented worker_init_fn: NumPy and Python seeded from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class NumpyShuffle(torch.utils.data.Sampler):
    """Shuffles with a NumPy Generator of its own."""

    def __init__(self, n: int) -> None:
        self.n, self.rng = n, np.random.default_rng(7)

    def __iter__(self):
        return iter(self.rng.permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class TorchShuffle(NumpyShuffle):
    """Shuffles with a torch.Generator kept under another name than `generator`."""

    def __init__(self, n: int) -> None:
        self.n, self.g = n, torch.Generator().manual_seed(8)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.g).tolist())


class OwnRandomBatches(BatchSampler):
    """A BatchSampler that drops a random sample of each batch with a random.Random of its own."""

    def __init__(self, sampler, batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.chooser = random.Random(5)

    def __iter__(self):
        for batch in super().__iter__():
            if len(batch) > 1:
                batch.pop(self.chooser.randrange(len(batch)))
            yield batch


class PythonShuffle(torch.utils.data.Sampler):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        order = list(range(self.n))
        random.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.n


def digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def script(
    kind="shuffle",
    workers=0,
    every=1,
    signal_at=(),
    leave_at=None,
    register_data=True,
    validate=False,
    shorten=False,
    crash_after_save=False,
):
    """The training function of a user's script: an epoch loop over a standard loader, dropout.

    signal_at: steps at whose start SIGTERM goes to the process and its DataLoader workers, from another
    process, as slurmstepd sends it to every process of a step; leave_at (step, "before"|"after"):
    break out of the loops before or after that step's optimizer update (with `shorten`, out of that
    epoch's batches() loop only, then session.save(), then an exception with `crash_after_save`);
    validate: an evaluation over a shuffled validation loader at the start of each epoch (it draws
    from the global generator)."""

    def train(session):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        x = torch.randn(203, 4, generator=torch.Generator().manual_seed(1))
        dataset = TensorDataset(x, x.sum(1, keepdim=True))
        loader = make_loader(kind, dataset, workers)
        model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        validation = DataLoader(dataset, batch_size=64, shuffle=True)
        session.register(model=model, optimizer=optimizer, **({"data": loader} if register_data else {}))
        session.restore()
        seen: list[int] = []
        for epoch in session.epochs(EPOCHS) if register_data else range(EPOCHS):
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            if validate:
                with torch.no_grad():
                    for vx, vy in validation:
                        torch.nn.functional.mse_loss(model(vx), vy)
            for xb, yb in session.batches(loader, every=every):
                if session.step in signal_at and session.update_due:
                    signal_like_slurmstepd(signal.SIGTERM)
                loss = torch.nn.functional.mse_loss(model(xb), yb) / every
                loss.backward()
                if leave_at == (session.step, "before") and seen[-1:] != [None]:
                    seen.append(None)  # once: a step without an update is not counted, session.step stays
                    optimizer.zero_grad()  # no gradient of it reaches the next update
                    break
                if session.update_due:  # the step's last batch: every-th, or the epoch's last
                    optimizer.step()
                    optimizer.zero_grad()
                if leave_at == (session.step, "after"):
                    break
                session.report(loss=loss.item())
                seen.append(int(xb[0, 0].mul(1e4).round()))
            else:
                continue
            if not shorten:
                break
            session.save()
            if crash_after_save:
                raise RuntimeError("after the shortened epoch's save")
        return {"params": digest(model), "step": session.step}

    return train


CONFIG = SessionConfig.from_mapping({"checkpoint": {"every_steps": 4, "keep_last": 2}})


def stopped_and_resumed(tmp_path, kind, workers, every=1, stops=(3, 9, 13)):
    """Outcomes of a run sent SIGTERM at each of `stops` (mid-epoch, and at an epoch's last step), resumed.
    No worker process outlives a run."""
    codes = []
    for stop in stops:
        outcome = run(script(kind, workers, every, signal_at=(stop,)), tmp_path, CONFIG)
        codes.append(outcome.exit_code)
        assert outcome.message == f"SIGTERM received: state saved at step {stop + 1}"  # no worker died of it
        assert not multiprocessing.active_children(), outcome.message
    final = run(script(kind, workers, every), tmp_path, CONFIG)
    return codes, final


LOADERS = [
    ("shuffle", 0),
    ("shuffle", 2),
    ("shuffle_generator", 0),
    ("shuffle_generator", 2),
    ("sampler_generator", 0),
    ("sequential", 0),
    ("batch_sampler", 0),
    ("batch_sampler", 2),
    ("drop_last", 0),
    ("distributed", 0),
    ("persistent", 2),
    ("python_random", 0),
    ("own_generators", 0),
    ("own_generators", 2),
    ("torch_generator_elsewhere", 0),
    ("stateful", 0),
    ("stateful", 2),
    ("stateful_weighted", 0),
    ("stateful_python_random", 2),
    ("stateful_random_generator", 0),
    ("augment", 0),
    ("augment", 2),
    ("augment_init", 3),
    ("augment_persistent", 2),
]


@pytest.mark.parametrize("kind,workers", LOADERS, ids=[f"{k}-{w}w" for k, w in LOADERS])
def test_a_standard_loader_in_an_epoch_loop_resumes_mid_epoch_bit_identically(tmp_path, kind, workers):
    if kind.startswith("stateful"):
        pytest.importorskip("torchdata.stateful_dataloader", reason="torchdata is not installed")
    reference = run(script(kind, workers), tmp_path / "reference", CONFIG)
    assert reference.exit_code == ExitCode.FINISHED, reference.message
    codes, final = stopped_and_resumed(tmp_path / "run", kind, workers)
    assert codes == [ExitCode.REQUEUE] * 3
    assert final.exit_code == ExitCode.FINISHED, final.message
    assert final.result == reference.result


def test_gradient_accumulation_steps_resume_bit_identically(tmp_path):
    reference = run(script(every=3), tmp_path / "reference", CONFIG)
    codes, final = stopped_and_resumed(tmp_path / "run", "shuffle", 0, every=3, stops=(2, 4))
    assert codes == [ExitCode.REQUEUE] * 2
    assert final.result == reference.result and reference.result["step"] == EPOCHS * 3  # 203 = 3 x (3 x 24)


def test_without_a_registered_loader_a_resume_warns_once_what_to_do(tmp_path, caplog):
    run(script(register_data=False, signal_at=(3,)), tmp_path, CONFIG)
    with caplog.at_level(logging.WARNING, logger="hydra_preempt"):
        run(script(register_data=False), tmp_path, CONFIG)
    warnings = [r.message for r in caplog.records if "no data position" in r.message]
    assert len(warnings) == 1 and "session.register(data=loader)" in warnings[0]


@pytest.mark.parametrize("kind", ["shuffle", "stateful"])
@pytest.mark.parametrize("where", ["after", "before"])
def test_leaving_the_loop_inside_a_step_saves_the_step_its_state_is_at_and_ends_the_epoch(tmp_path, where, kind):
    """An early stop at step 10 (index 9, epoch 1 of 7-batch epochs): after the update the run ends at
    step 10 holding it; before the update, at step 9 (a step without an update is not counted). The
    epoch left early is over: a run continued from it goes on with the next epoch, as a run that only
    cut that epoch short does; and so does one that crashed after the save that followed the cut."""
    shortened = run(script(kind, leave_at=(9, where), shorten=True), tmp_path / "shortened", CONFIG)
    stopped = run(script(kind, leave_at=(9, where)), tmp_path / "run", CONFIG)
    expected = 10 if where == "after" else 9
    assert (stopped.exit_code, stopped.step, stopped.result["step"]) == (ExitCode.FINISHED, expected, expected)
    manifest = json.loads((tmp_path / "run" / "checkpoints" / f"step-{expected:09d}" / "MANIFEST.json").read_text())
    assert manifest["reason"] in ("final", "periodic")
    continued = run(script(kind), tmp_path / "run", CONFIG)
    assert continued.result == shortened.result and shortened.result["step"] == expected + 7
    crashed = run(script(kind, leave_at=(9, where), shorten=True, crash_after_save=True), tmp_path / "crashed", CONFIG)
    assert crashed.exit_code == ExitCode.FAILED and crashed.step == expected
    assert run(script(kind), tmp_path / "crashed", CONFIG).result == shortened.result


def test_an_exception_after_the_update_does_not_count_its_step(tmp_path):
    def failing(session):
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        session.register(model=model, optimizer=optimizer)
        for step in session.steps(10):
            model(torch.ones(1, 2)).sum().backward()
            optimizer.step()
            if step == 5:
                raise RuntimeError("after the update")

    outcome = run(failing, tmp_path, CONFIG)
    assert outcome.status is Status.FAILED and outcome.step == 5 and "emergency" not in outcome.message


def test_run_writes_the_returned_dict_to_result_json_and_takes_a_plain_mapping(tmp_path):
    outcome = run(lambda session: {"answer": 42, "loss": torch.tensor(0.5)}, tmp_path, {"progress": {"every_s": 5}})
    assert outcome.exit_code == ExitCode.FINISHED
    assert json.loads((tmp_path / "result.json").read_text()) == {"answer": 42, "loss": 0.5}


def test_a_session_result_is_not_overwritten_by_the_returned_value(tmp_path):
    def train(session):
        session.write_result({"written": True})
        return {"returned": True}

    run(train, tmp_path)
    assert json.loads((tmp_path / "result.json").read_text()) == {"written": True}


@pytest.mark.parametrize(
    "config,said",
    [
        ({"checkpoint": {"every_steps": -1}}, "checkpoint.every_steps"),
        ({"chekpoint": {}}, "chekpoint"),
        (["checkpoint"], "config must be a SessionConfig or a mapping"),
    ],
)
def test_a_bad_config_is_refused_in_one_line(tmp_path, config, said):
    outcome = run(lambda session: None, tmp_path / "run", config)
    assert (outcome.exit_code, outcome.step) == (ExitCode.USAGE, 0)
    assert said in outcome.message and "\n" not in outcome.message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_epochs_without_a_registered_loader_is_one_line():
    from hydra_preempt import Session

    session = Session("/nonexistent-never-created")
    session._restored = True  # nothing to load: the check comes first
    with pytest.raises(ConfigError, match="register one"):
        session.epochs(3)


# -- real processes: what a plain script shows, the watchdog -----------------------------------------
def own_script(run_dir: Path, *args: str, stop_at: int | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "tests.integration.own_script", str(run_dir), *args]
    return run_signalled(cmd, stop_at, ROOT, timeout=120)


@pytest.mark.slow
def test_a_plain_script_shows_progress_and_events_and_resumes_exactly_with_augmenting_workers(tmp_path):
    code, err = own_script(tmp_path / "reference", "--workers", "2", "--augment")
    assert code == 0, err
    first, err1 = own_script(tmp_path / "run", "--workers", "2", "--augment", stop_at=13)  # mid-epoch 2 of 10
    assert first == ExitCode.REQUEUE, err1
    for line in ("[hydra_preempt] no checkpoint in", "[hydra_preempt] saved step-000000008", "SIGTERM received"):
        assert line in err1, err1
    assert "[hydra_preempt] step " in err1  # the progress line
    second, err2 = own_script(tmp_path / "run", "--workers", "2", "--augment")
    assert second == 0, err2
    assert "[hydra_preempt] resumed from step-0000000" in err2 and "[hydra_preempt] finished at step 40" in err2
    results = [json.loads((tmp_path / d / "result.json").read_text()) for d in ("reference", "run")]
    assert results[0] == results[1]


@pytest.mark.slow
@pytest.mark.parametrize("announced", [True, False])
def test_an_announced_long_evaluation_is_no_hang_and_an_unannounced_one_is(tmp_path, announced):
    args = ["--epochs", "1", "--evaluate-s", "5", *(["--announce"] if announced else [])]
    code, err = own_script(tmp_path, *args)
    if announced:
        assert code == 0, err
    else:
        assert code == ExitCode.HANG and "hang" in err.lower(), err


def test_the_default_allowance_against_a_15_minute_evaluation_every_5000_steps():
    """0.2 s steps: a step may take max(10 x 0.2 s, min_timeout_s = 600 s) = 600 s, less than an
    unannounced 15-minute evaluation; announced, it gets watchdog.startup_s (1800 s) or its own."""
    from hydra_preempt.session.watchdog import Watchdog, hang_timeout

    assert hang_timeout([0.2] * 5000, None, 600.0) == 600.0 < 15 * 60
    dog = Watchdog(None, 600.0, 1800.0)
    dog.beat()
    with dog.phase("evaluation"):
        assert dog.allowance(dog._mark[1]) == 1800.0 >= 15 * 60
    with dog.phase("evaluation", 3600):
        assert dog.allowance(dog._mark[1]) == 3600
    assert dog._mark[1] == "step"


@pytest.mark.slow
def test_a_distributed_sampler_over_two_gloo_ranks_with_augmenting_workers_resumes_mid_epoch_bit_identically(tmp_path):
    def ranks(run_dir: Path, stop_at: int | None = None) -> list[int]:
        port = str(free_port())
        procs = []
        for rank in range(2):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2"}
            cmd = [sys.executable, "-m", "tests.integration.own_script", str(run_dir), "--epochs", "3"]
            cmd += ["--workers", "2", "--augment"]
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
        for line in procs[1].stdout:  # SIGTERM to rank 1 and its workers alone, mid-epoch 2 (10 steps an epoch)
            if stop_at is not None and line.strip() == f"step {stop_at}":
                signal_group(procs[1].pid, signal.SIGTERM)
                stop_at = None
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode in (0, ExitCode.REQUEUE) for p in procs), outputs
        return [p.returncode for p in procs]

    assert ranks(tmp_path / "reference") == [0, 0]
    assert ranks(tmp_path / "run", stop_at=14) == [ExitCode.REQUEUE] * 2
    assert ranks(tmp_path / "run") == [0, 0]
    results = [json.loads((tmp_path / d / "result.json").read_text()) for d in ("reference", "run")]
    assert results[0] == results[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_evaluation_at_each_epoch_start_leaves_a_resume_exact(tmp_path):
    """Code between epochs() and batches() runs again for the epoch a resume lands in; what it draws
    from the generators leaves no trace (kills mid-epoch and on an epoch's last step)."""
    reference = run(script(validate=True), tmp_path / "reference", CONFIG)
    for stop in (3, 13):  # 7 batches an epoch: 13 is epoch 1's last step
        assert run(script(validate=True, signal_at=(stop,)), tmp_path / "run", CONFIG).exit_code == ExitCode.REQUEUE
    assert run(script(validate=True), tmp_path / "run", CONFIG).result == reference.result


def test_batch_index_continues_across_a_resume_where_enumerate_restarts(tmp_path):
    seen: list[tuple[int, int]] = []

    def train(session, stop_at=None):
        loader = DataLoader(TensorDataset(torch.arange(70.0)), batch_size=10)
        session.register(data=loader, model=torch.nn.Linear(1, 1))
        for epoch in session.epochs(2):
            for _ in session.batches(loader):
                seen.append((epoch, session.batch_index))
                if session.step == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)

    assert run(lambda s: train(s, stop_at=3), tmp_path, CONFIG).exit_code == ExitCode.REQUEUE
    run(train, tmp_path, CONFIG)
    assert seen == [(0, i) for i in range(7)] + [(1, i) for i in range(7)]


def test_misuses_of_the_loops_are_one_line(tmp_path, caplog):
    loader = DataLoader(TensorDataset(torch.arange(20.0)), batch_size=5)

    def two_passes(session):
        session.register(data=loader)
        for _ in session.epochs(2):
            for _ in session.batches(loader):
                pass
            for _ in session.batches(loader):
                pass

    def nested(session):
        session.register(data=loader)
        for _ in session.batches(loader):
            for _ in session.batches(DataLoader(TensorDataset(torch.arange(4.0)))):
                pass

    for train, said in ((two_passes, "a second pass over the same DataLoader"), (nested, "inside a step")):
        outcome = run(train, tmp_path / train.__name__, CONFIG)
        assert outcome.exit_code == ExitCode.USAGE and said in outcome.message, outcome.message

    def plain_for(session):
        session.register(data=loader)
        batches = iter(loader)
        for _ in session.steps(3):
            next(batches)

    def auxiliary(session):  # the main loader through batches(), an auxiliary batch per step drawn directly
        aux = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2, shuffle=True)
        session.register(data=loader, aux=aux)
        for _ in session.epochs(2, loader=loader):
            for _ in session.batches(loader):
                next(iter(aux))

    with caplog.at_level(logging.WARNING, logger="hydra_preempt"):
        run(plain_for, tmp_path / "plain", CONFIG)
        run(auxiliary, tmp_path / "auxiliary", CONFIG)
    said = [r.getMessage() for r in caplog.records if "was iterated without session.batches()" in r.getMessage()]
    assert [m.split(",")[0] for m in said] == ["'data'", "'aux'"]  # once each


@pytest.mark.parametrize(
    "change,said",
    [
        ({"yielded": 12}, "lies beyond its pass"),
        ({"yielded": 2**61}, "lies beyond its pass"),
        ({"passes": "1"}, "must hold integers"),
        ({"batches": "7"}, "must hold integers"),
        ({"batches": 8}, "batches a pass, the checkpoint's gave 8"),
        ({"workers_pass": "x"}, "workers_pass"),
        ({"at_save": {"cpu": torch.zeros(3, dtype=torch.uint8), "generators": []}}, "valid generator states"),
        ({"before_pass": {"cpu": torch.zeros(5056), "generators": []}}, "valid generator states"),
        (
            {
                "worker_rng": [
                    {
                        "torch": torch.zeros(3, dtype=torch.uint8),
                        "numpy": np.random.get_state(),
                        "python": random.getstate(),
                    }
                ]
            },
            "its workers' batches",
        ),
        ({"worker_rng": "x"}, "its workers' batches"),
    ],
)
def test_a_tampered_position_is_refused_before_anything_loads(tmp_path, change, said):
    from hydra_preempt.loader_position import LoaderPosition

    position = LoaderPosition(DataLoader(TensorDataset(torch.arange(70.0)), batch_size=10, shuffle=True))
    batches = position.iterate()
    next(batches)
    state = {**position.state_dict(), **change}
    problems = LoaderPosition(position.loader).check_state_dict(state)
    assert problems and said in problems[0], problems


def shut_down_workers(*positions) -> None:
    """Persistent workers end with their loader's iterator: at once, not 5 s each when a collection frees it."""
    for position in positions:
        if (iterator := getattr(position.loader, "_iterator", None)) is not None:
            iterator._shutdown_workers()
            position.loader._iterator = None


def batches_of(position, count=None):
    batches = position.iterate()
    return [x.clone() for x, _ in (batches if count is None else (next(batches) for _ in range(count)))]


@pytest.mark.parametrize("options", [{}, {"persistent_workers": True}], ids=["workers", "persistent"])
def test_augmenting_workers_continue_their_streams_batch_by_batch_across_a_save(options):
    """Each batch of a pass left at batch 5 and continued by another loader equals the uninterrupted
    pass's, noise included; and so do the next pass's (persistent workers carry their streams on).
    (Under the spawn start method the wrapped collate_fn travels pickled: it pickles.)"""
    import pickle

    from hydra_preempt.loader_position import LoaderPosition, _CarryRng

    assert pickle.loads(pickle.dumps(_CarryRng(torch.utils.data.default_collate)))([1, 2]).tolist() == [1, 2]

    def loader():
        x = torch.randn(203, 4, generator=torch.Generator().manual_seed(1))
        return DataLoader(Augmented(TensorDataset(x, x)), batch_size=16, shuffle=True, num_workers=3, **options)

    torch.manual_seed(0)
    reference = LoaderPosition(loader())
    expected = [batches_of(reference), batches_of(reference)]
    torch.manual_seed(0)
    first = LoaderPosition(loader())
    head = batches_of(first, 5)
    state = first.state_dict()
    torch.manual_seed(123)  # the generators move on before the resume: the position brings them back
    second = LoaderPosition(loader())
    second.load_state_dict(state)
    got = [head + batches_of(second), batches_of(second)]
    shut_down_workers(reference, first, second)
    for want_pass, got_pass in zip(expected, got):
        assert len(want_pass) == len(got_pass) == 13
        assert all(torch.equal(a, b) for a, b in zip(want_pass, got_pass))


def test_a_checkpoint_of_another_worker_count_resumes_the_batches_and_says_the_draws_differ(caplog):
    from hydra_preempt.loader_position import LoaderPosition

    def loader(workers):
        return DataLoader(
            Augmented(TensorDataset(torch.ones(64, 2), torch.ones(64))), batch_size=8, shuffle=True, num_workers=workers
        )

    saved = LoaderPosition(loader(2))
    batches_of(saved, 3)
    resumed = LoaderPosition(loader(3))
    with caplog.at_level(logging.WARNING, logger="hydra_preempt"):
        resumed.load_state_dict(saved.state_dict())
    assert "had 2 workers, this one has 3: random draws inside the workers" in caplog.text
    assert len(batches_of(resumed)) == 5


def test_a_registered_loaders_persistent_workers_serve_a_plain_for_loop_with_plain_batches():
    """An evaluation over the training loader itself reuses the workers the session made."""
    from hydra_preempt.loader_position import LoaderPosition

    x = torch.arange(40.0).reshape(20, 2)
    loader = DataLoader(TensorDataset(x, x.sum(1)), batch_size=5, num_workers=2, persistent_workers=True)
    position = LoaderPosition(loader)
    assert len(batches_of(position)) == 4
    plain = [(xb, yb) for xb, yb in loader]
    shut_down_workers(position)
    assert torch.equal(torch.cat([xb for xb, _ in plain]), x) and plain[0][1].shape == (5,)


@pytest.mark.parametrize(
    "change,said",
    [
        ({"batch_size": 33}, "batch_size 32 -> 33"),  # 7 batches a pass either way
        ({"samples": 200}, "dataset samples 203 -> 200"),
        ({"drop_last": True}, "drop_last False -> True"),
        ({"sampler": "sequential"}, "sampler 'torch.utils.data.sampler.RandomSampler' -> 'torch.utils.data.sampler"),
    ],
)
def test_a_loader_changed_so_that_its_position_moves_is_refused_in_one_line_naming_old_and_new(
    tmp_path, caplog, change, said
):
    def train(session, batch_size=32, samples=203, drop_last=False, sampler="random", stop_at=None):
        x = torch.randn(samples, 2)
        loader = DataLoader(
            TensorDataset(x), batch_size=batch_size, shuffle=sampler == "random", drop_last=drop_last, num_workers=2
        )
        session.register(data=loader)
        for _ in session.epochs(2):
            for _ in session.batches(loader):
                if session.step == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)

    assert run(lambda s: train(s, stop_at=3), tmp_path, CONFIG).exit_code == ExitCode.REQUEUE
    with caplog.at_level(logging.INFO, logger="hydra_preempt"):
        outcome = run(lambda s: train(s, **change), tmp_path, CONFIG)
    assert outcome.exit_code == ExitCode.USAGE and said in outcome.message and "\n" not in outcome.message
    assert "start a new run directory" in outcome.message
    assert sum("the loader changed since the save" in r.getMessage() for r in caplog.records) == 1
    assert run(train, tmp_path, CONFIG).exit_code == ExitCode.FINISHED  # the same loader goes on


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(10))


class StreamWithState(Stream):
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize(
    "dataset,said",
    [(Stream(), "it has no state_dict()/load_state_dict()"), (StreamWithState(), "StatefulDataLoader can")],
)
def test_a_plain_loader_over_an_iterable_dataset_is_refused_saying_what_would_work(dataset, said):
    from hydra_preempt.loader_position import LoaderPosition

    with pytest.raises(ConfigError, match="an IterableDataset") as refused:
        LoaderPosition(DataLoader(dataset, batch_size=2))
    assert said in str(refused.value) and "\n" not in str(refused.value)


def stateful_position(batches: int, workers: int = 0):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from hydra_preempt.loader_position import LoaderPosition

    position = LoaderPosition(
        StatefulDataLoader(TensorDataset(torch.arange(100.0)), batch_size=10, shuffle=True, num_workers=workers)
    )
    if batches:
        iterator = position.iterate()
        for _ in range(batches):
            next(iterator)
    return position


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stateful_loaders_state_edited_and_signed_again_is_refused_in_one_line(workers):
    pytest.importorskip("torchdata.stateful_dataloader", reason="torchdata is not installed")
    from hydra_preempt.errors import CheckpointReadError

    state = stateful_position(3, workers).state_dict()
    loader = state["loader"]
    main = loader["_snapshot"]["_main_snapshot"] if workers else loader
    miscounted = (
        {**state, "loader": {**loader, "_snapshot": {**loader["_snapshot"], "_snapshot_step": 7}}}
        if workers
        else {**state, "loader": {**loader, "_num_yielded": "x"}}
    )
    assert "batches, its position 3" in stateful_position(0, workers).check_state_dict(miscounted)[0]
    draws = {**state, "sampler_draws": {"index": {"iter": {"cpu": "x"}, "next": None}}}
    assert "samplers' draws" in stateful_position(0, workers).check_state_dict(draws)[0]
    main["_sampler_iter_state"] = "garbage"  # counts agree: torchdata meets it when the pass begins
    resumed = stateful_position(0, workers)
    resumed.load_state_dict(state)
    with pytest.raises(CheckpointReadError, match="StatefulDataLoader state does not load into this loader"):
        resumed.iterate()


class ReadOnce:
    """A registered object whose state_dict() raises StopIteration once armed (an iterator's end leaking)."""

    armed = False

    def state_dict(self):
        if self.armed:
            raise StopIteration
        return {}

    def load_state_dict(self, state):
        pass


def test_an_emergency_save_that_cannot_read_the_state_never_raises_out_of_run(tmp_path, caplog):
    def train(session):
        odd = ReadOnce()
        session.register(model=torch.nn.Linear(2, 1), odd=odd)
        session.restore()
        odd.armed = True
        raise RuntimeError("the program's own error")

    with caplog.at_level(logging.ERROR, logger="hydra_preempt"):
        outcome = run(train, tmp_path, CONFIG)
    assert outcome.status is Status.FAILED and "the program's own error" in outcome.message
    assert "no emergency checkpoint: reading the registered objects' state failed (StopIteration" in caplog.text


def two_loaders(seen: list, stop_at: int | None = None, fail_epoch_end: int | None = None, save_each_epoch=False):
    """An epoch of a main loader's pass, then an auxiliary loader's, then a per-epoch LR scheduler step
    (an exception just before it in epoch `fail_epoch_end`; with `save_each_epoch`, session.save() after it)."""

    def train(session):
        torch.manual_seed(0)
        main = DataLoader(TensorDataset(torch.arange(56.0)), batch_size=8, shuffle=True)
        aux = DataLoader(TensorDataset(torch.arange(100.0, 124.0)), batch_size=8, shuffle=True, num_workers=2)
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        session.register(model=model, optimizer=optimizer, scheduler=scheduler, main=main, aux=aux)
        session.restore()
        for epoch in session.epochs(3, loader=main):
            for loader in (main, aux):
                for (xb,) in session.batches(loader):
                    if session.step == stop_at:
                        signal_like_slurmstepd(signal.SIGTERM)
                    model(xb[:, None]).square().mean().backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    seen.append((epoch, optimizer.param_groups[0]["lr"], *xb.int().tolist()))
            if epoch == fail_epoch_end:
                raise RuntimeError("in the epoch's end, outside its steps")
            scheduler.step()
            if save_each_epoch:
                session.save()  # the epoch's end done: a resume must not step the scheduler again
        return {"params": digest(model), "step": session.step}

    return train


def test_two_loaders_in_one_epoch_resume_exactly_wherever_the_stop_lands(tmp_path):
    """Stops mid-pass of the second loader, at the epoch's last step (its scheduler step comes after),
    and at the first loader's last step: every step's samples and learning rate as uninterrupted."""
    reference: list = []
    expected = run(two_loaders(reference), tmp_path / "reference", CONFIG).result
    seen: list = []
    for stop in (8, 19, 26):  # 10 steps an epoch: 7 of main, 3 of aux
        outcome = run(two_loaders(seen, stop), tmp_path / "run", CONFIG)
        assert outcome.exit_code == ExitCode.REQUEUE, outcome.message
    final = run(two_loaders(seen), tmp_path / "run", CONFIG)
    assert seen == reference and len(reference) == 30, [s[:3] for s in seen]
    assert final.result == expected


MANUAL_SAVES_ONLY = SessionConfig.from_mapping({"checkpoint": {"every_steps": None, "emergency": False}})


@pytest.mark.parametrize("save_each_epoch", [False, True], ids=["emergency", "saved-after-the-scheduler"])
def test_an_exception_at_an_epochs_end_resumes_into_that_end_once(tmp_path, save_each_epoch):
    """An exception between an epoch's loops and its scheduler step. Its emergency checkpoint keeps the
    epoch in progress: the resume runs that end, once. Without one, the newest checkpoint is the
    session.save() after the previous epoch's scheduler step, which counts that epoch done: the resume
    starts the next one and steps no scheduler twice."""
    config = MANUAL_SAVES_ONLY if save_each_epoch else CONFIG
    expected = run(two_loaders([], save_each_epoch=save_each_epoch), tmp_path / "reference", config).result
    crashed = run(two_loaders([], fail_epoch_end=1, save_each_epoch=save_each_epoch), tmp_path / "run", config)
    assert crashed.exit_code == ExitCode.FAILED
    assert run(two_loaders([], save_each_epoch=save_each_epoch), tmp_path / "run", config).result == expected


def test_a_loader_without_batching_and_with_workers_resumes_mid_pass():
    """batch_size=None: the sampler gives single indices, which carry no worker states (not positioned)."""
    from hydra_preempt.loader_position import LoaderPosition

    def loader():
        return DataLoader(
            TensorDataset(torch.arange(12.0), torch.arange(12.0)), batch_size=None, shuffle=True, num_workers=2
        )

    torch.manual_seed(0)
    reference = batches_of(LoaderPosition(loader()))
    torch.manual_seed(0)
    first = LoaderPosition(loader())
    head = batches_of(first, 5)
    second = LoaderPosition(loader())
    second.load_state_dict(first.state_dict())
    assert [int(x) for x in head + batches_of(second)] == [int(x) for x in reference]
