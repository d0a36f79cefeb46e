"""The checkpoint store on a real file system: atomicity, verification, fallback, retention."""

import json
import logging
import os
import random
import stat

import numpy as np
import pytest
import torch

from hydra_preempt.checkpoint.layout import DATA_FILE, MANIFEST_FILE, STATE_FILE
from hydra_preempt.checkpoint.retention import RetentionPolicy
from hydra_preempt.checkpoint.store import OWNER_FILE, CheckpointStore
from hydra_preempt.checkpoint.writer import Snapshot
from hydra_preempt.errors import CheckpointDirError, CheckpointWriteError, UnsupportedStateError


def state(value: float = 1.0, size: int = 1000) -> dict:
    return {"w": torch.full((size,), value), "step_value": value}


def save(store, step, value=None, reason="periodic", metrics=None, size=1000):
    return store.save(
        Snapshot.capture(state(float(step if value is None else value), size)), step, reason, metrics or {}
    )


def test_round_trip_keeps_types_and_bits():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tree = {
        "optimizer": opt.state_dict(),  # int keys, tuples (betas), 0-d tensors (step)
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "bf16": torch.randn(5, dtype=torch.float32).to(torch.bfloat16),
        "bools": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "noncontiguous": torch.arange(12.0).reshape(3, 4).t(),
        "uint32": np.arange(5, dtype=np.uint32),
        "nested": {"a": [1, (2, 3), None, "x", 1.5e-300, float("inf")], "__tensor__": 7},
        "numpy_scalar": np.float32(0.25),
    }
    import tempfile

    store = CheckpointStore(tempfile.mkdtemp())
    store.prepare()
    store.save(Snapshot.capture(tree), 1, "manual")
    info, back = store.load_latest()
    assert info.step == 1 and info.reason == "manual"
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(back["optimizer"]["state"]) == {0, 1}
    for key in ("bf16", "bools", "empty", "scalar", "noncontiguous"):
        assert back[key].dtype == tree[key].dtype and torch.equal(back[key], tree[key]), key
    assert back["python_rng"] == tree["python_rng"]
    assert back["numpy_rng"][0] == "MT19937" and np.array_equal(back["numpy_rng"][1], tree["numpy_rng"][1])
    assert back["uint32"].dtype == np.uint32 and np.array_equal(back["uint32"], tree["uint32"])
    assert back["nested"] == tree["nested"]
    assert back["numpy_scalar"] == 0.25


def test_state_file_is_plain_json_no_pickle(tmp_path):
    store = CheckpointStore(tmp_path)
    info = save(store, 1)
    parsed = json.loads((info.path / STATE_FILE).read_text())
    assert parsed["arrays"][0]["dtype"] == "float32"
    assert b"\x80" not in (info.path / STATE_FILE).read_bytes()[:2]  # not a pickle header


@pytest.mark.parametrize(
    "bad, where", [(object(), "state.x"), ({1: {2: lambda: 0}}, "state.x.1.2"), (np.array([object()]), "state.x")]
)
def test_unsupported_values_are_named(tmp_path, bad, where):
    with pytest.raises(UnsupportedStateError, match=where.replace(".", r"\.")):
        Snapshot.capture({"x": bad})


def test_retention_keeps_last_and_best(tmp_path):
    store = CheckpointStore(tmp_path, RetentionPolicy(keep_last=2, keep_best=2, metric="loss"))
    losses = [5.0, 1.0, 4.0, 0.5, 6.0, 7.0, 8.0]
    for step, loss in enumerate(losses, start=1):
        save(store, step, metrics={"loss": loss})
        assert len(store.complete()) <= 4
    assert [i.step for i in store.complete()] == [2, 4, 6, 7]
    index = json.loads((tmp_path / "index.json").read_text())
    assert [b["step"] for b in index["best"]] == [4, 2]
    assert index["latest"] == 7


def _break(path, how):
    if how == "no manifest":
        (path / MANIFEST_FILE).unlink()
    elif how == "garbage manifest":
        (path / MANIFEST_FILE).write_text("{not json")
    elif how == "truncated data":
        with open(path / DATA_FILE, "r+b") as f:
            f.truncate(100)
    elif how == "flipped bit":
        with open(path / DATA_FILE, "r+b") as f:
            f.seek(17)
            byte = f.read(1)
            f.seek(17)
            f.write(bytes([byte[0] ^ 0x01]))
    elif how == "missing state":
        (path / STATE_FILE).unlink()


@pytest.mark.parametrize("how", ["no manifest", "garbage manifest", "truncated data", "flipped bit", "missing state"])
def test_damaged_newest_is_reported_and_previous_loaded(tmp_path, caplog, how):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    newest = save(store, 2)
    _break(newest.path, how)
    with caplog.at_level(logging.WARNING, logger="hydra_preempt"):
        info, tree = store.load_latest()
    assert info.step == 1 and torch.equal(tree["w"], torch.full((1000,), 1.0))
    assert "step-000000002" in caplog.text
    # kept for inspection, never picked again
    assert not newest.path.exists()
    assert any(p.name.startswith("corrupt-step-000000002") for p in tmp_path.iterdir())
    assert [i.step for i in store.complete()] == [1]


def test_nothing_loadable_returns_none(tmp_path):
    store = CheckpointStore(tmp_path)
    _break(save(store, 1).path, "flipped bit")
    assert store.load_latest() is None


def test_every_temporary_is_stale_under_the_run_lock(tmp_path):
    """prepare() runs only under the run lock: saves in progress of any host or pid, deletions, index
    rewrites and probes were all left by a process that is gone."""
    store = CheckpointStore(tmp_path)
    save(store, 1)
    leftovers = [
        ".tmp-step-000000002.otherhost.123",
        ".deleting-step-000000000",
        ".index.json.tmp-77",
        ".write-probe.5",
    ]
    for name in leftovers[:2]:
        (tmp_path / name).mkdir()
        (tmp_path / name / DATA_FILE).write_bytes(b"half")
    for name in leftovers[2:]:
        (tmp_path / name).write_text("{")
    assert sorted(store.prepare()) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "step-000000001"]
    assert store.load_latest()[0].step == 1


def test_a_checkpoint_directory_belongs_to_one_run(tmp_path):
    a = {"run_id": "a" * 32, "run_dir": "/runs/a"}
    store = CheckpointStore(tmp_path / "shared")
    store.prepare(a)
    save(store, 1)
    store.prepare(a)  # the same run, restarted
    with pytest.raises(CheckpointDirError, match=r"belongs to another run \(/runs/a, run id a{32}\)"):
        CheckpointStore(tmp_path / "shared").prepare({"run_id": "b" * 32, "run_dir": "/runs/b"})
    (tmp_path / "shared" / OWNER_FILE).write_text("{garbage")
    with pytest.raises(CheckpointDirError, match=r"unreadable OWNER\.json"):
        store.prepare(a)
    assert store.load_latest()[0].step == 1


def test_same_step_twice_keeps_the_first(tmp_path):
    store = CheckpointStore(tmp_path)
    first = save(store, 5, value=1.0)
    again = save(store, 5, value=2.0)
    assert again.path == first.path
    assert torch.equal(store.load_latest()[1]["w"], torch.full((1000,), 1.0))


def test_disk_full_leaves_previous_checkpoint_intact(tmpfs):
    directory = tmpfs("2m")
    store = CheckpointStore(directory / "ckpt")
    store.prepare()
    save(store, 1, size=100_000)  # 400 kB
    with pytest.raises(CheckpointWriteError, match=r"disk full.*step 1 is intact"):
        save(store, 2, size=1_000_000)  # 4 MB: does not fit
    assert [p.name for p in (directory / "ckpt").iterdir() if p.name.startswith(".tmp")] == []
    info, tree = store.load_latest()
    assert info.step == 1 and torch.equal(tree["w"], torch.full((100_000,), 1.0))


def test_unusable_directories_are_refused_clearly(tmp_path, tmpfs):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CheckpointDirError, match="not usable: Not a directory"):
        CheckpointStore(a_file / "ckpt").prepare()
    read_only = tmpfs("1m", "ro")
    with pytest.raises(CheckpointDirError, match="Read-only file system"):
        CheckpointStore(read_only / "ckpt").prepare()


def _fill_leaving(directory, pages: int) -> None:
    """Fill a tmpfs until it is full, then free exactly `pages` pages (tmpfs allocates by page)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096) == 4096:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, (filler.stat().st_size // 4096 - pages) * 4096)


def test_disk_full_in_the_index_rewrite_leaves_a_consistent_directory(tmpfs, caplog):
    """The new checkpoint fits, index.json does not: the old index is removed (it would name a deleted
    checkpoint), retention deletes anyway (which frees space), and the index is written after."""
    directory = tmpfs("1m")
    store = CheckpointStore(directory / "ckpt", RetentionPolicy(keep_last=2))
    store.prepare()
    save(store, 1, size=100)
    save(store, 2, size=100)
    _fill_leaving(directory, pages=3)  # tensors.bin, state.json, MANIFEST.json of one more checkpoint
    with caplog.at_level(logging.WARNING, logger="hydra_preempt.checkpoint"):
        save(store, 3, size=100)
    assert sorted(p.name for p in (directory / "ckpt").iterdir()) == ["index.json", "step-000000002", "step-000000003"]
    index = json.loads((directory / "ckpt" / "index.json").read_text())
    assert index["latest"] == 3 and [c["step"] for c in index["checkpoints"]] == [2, 3]
    assert store.load_latest()[0].step == 3


def test_disk_full_with_nothing_to_delete_leaves_no_stale_index(tmpfs, caplog):
    directory = tmpfs("1m")
    store = CheckpointStore(directory / "ckpt", RetentionPolicy(keep_last=5))
    store.prepare()
    save(store, 1, size=100)
    _fill_leaving(directory, pages=3)
    with caplog.at_level(logging.WARNING, logger="hydra_preempt.checkpoint"):
        save(store, 2, size=100)
    names = sorted(p.name for p in (directory / "ckpt").iterdir())
    index = directory / "ckpt" / "index.json"
    assert "step-000000002" in names and not any(".tmp-" in n for n in names)
    # either no index (and a warning that says so), or an index that names the new checkpoint
    assert (not index.exists() and "could not be written (disk full)" in caplog.text) or json.loads(index.read_text())[
        "latest"
    ] == 2
    assert store.load_latest()[0].step == 2


def test_an_atomic_write_makes_its_file_as_open_would_under_the_umask(tmp_path):
    """mkstemp creates 0600; the file then gets what the process's umask gives any new file."""
    from hydra_preempt.fsutil import atomic_write_text

    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "result.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o640


def test_a_data_file_written_in_parts_whose_disk_writes_start_early_loads_bit_identically(tmp_path, monkeypatch):
    """tensors.bin is written in WRITEBACK_EVERY parts, the disk write of each started once it is
    written (sync_file_range); an array larger than a part is split, a smaller one is not."""
    from hydra_preempt.checkpoint import writer
    from hydra_preempt.fsutil import EarlyWriteback

    started: list[tuple[int, int]] = []
    real = EarlyWriteback.written

    def recorded(self, end):
        before = self.started
        real(self, end)
        if self.started != before:
            started.append((before, end))

    monkeypatch.setattr(writer, "WRITEBACK_EVERY", 4096)
    monkeypatch.setattr(EarlyWriteback, "written", recorded)
    tree = {"big": torch.randn(10_000), "small": torch.arange(10), "more": torch.randn(3000)}
    store = CheckpointStore(tmp_path)
    store.save(Snapshot.capture(tree), 1, "manual")
    _, back = store.load_latest()
    assert all(torch.equal(back[k], tree[k]) for k in tree)
    assert started[0] == (0, 4096) and len(started) >= 10  # 52 KB in parts of 4 KB
    assert all(b == a for (_, a), (b, _) in zip(started, started[1:]))  # each range once, in order


def test_early_writeback_that_the_file_cannot_take_falls_back_to_fsync_alone(tmp_path):
    from hydra_preempt.fsutil import EarlyWriteback

    read, write = os.pipe()  # sync_file_range fails on a pipe (ESPIPE)
    try:
        writeback = EarlyWriteback(write, every=1)
        os.write(write, b"xy")
        writeback.written(2)
        writeback.written(4)
        assert writeback.started == 2 and writeback._call is None
    finally:
        os.close(read)
        os.close(write)
