"""Checkpoint directories that a bit flip, a careless user or an attacker has changed: nothing is
trusted before it is verified, nothing but regular files inside the directory is read, and every
failure is a corrupt checkpoint (moved aside, the previous one loaded), never a crash or a hang."""

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hydra_preempt.checkpoint.layout import (
    CHECKSUM,
    DATA_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    CorruptCheckpointError,
    checkpoint_info,
    read_manifest,
    sign_manifest,
    verify_manifest,
)
from hydra_preempt.checkpoint.retention import RetentionPolicy
from hydra_preempt.checkpoint.store import CheckpointStore
from hydra_preempt.checkpoint.writer import Snapshot, read_checkpoint_files
from hydra_preempt.doors.hydra_sweep import run_standing
from hydra_preempt.rundir import RunLog


def make_store(tmp_path, steps=(10, 20, 30), keep_last=3):
    store = CheckpointStore(tmp_path / "checkpoints", RetentionPolicy(keep_last=keep_last))
    store.prepare()
    for step in steps:
        tree = {"w": torch.full((4,), float(step)), "rng": np.random.get_state(), "t": (1, [2, {"x": None}])}
        store.save(Snapshot.capture(tree), step, "periodic", {"loss": 1.0 / step})
    return store


def manifest_of(store, step) -> dict:
    return json.loads((store.step_path(step) / MANIFEST_FILE).read_text())


def write_manifest(store, step, manifest, sign=True):
    data = json.dumps(sign_manifest(manifest) if sign else manifest)
    (store.step_path(step) / MANIFEST_FILE).write_text(data)


def resign_state(store, step, edit):
    """Replace state.json with edit(parsed state) and sign everything again, as an attacker could."""
    path = store.step_path(step)
    parsed = json.loads((path / STATE_FILE).read_text())
    data = edit(parsed)
    data = data if isinstance(data, bytes) else json.dumps(data).encode()
    (path / STATE_FILE).write_bytes(data)
    manifest = manifest_of(store, step)
    manifest["files"][STATE_FILE] = {"size": len(data), CHECKSUM: xxhash.xxh3_128_hexdigest(data)}
    write_manifest(store, step, manifest)


def newest_loaded(store) -> int:
    info, tree = store.load_latest()
    assert float(tree["w"][0]) == info.step  # the data is the data of that step
    return info.step


def corrupt_names(store):
    return sorted(p.name.split("-")[2] for p in store.directory.iterdir() if p.name.startswith("corrupt-"))


# -- the manifest -----------------------------------------------------------------------------
def test_a_bit_flip_in_a_manifest_step_is_caught_before_retention_acts_on_it(tmp_path):
    store = make_store(tmp_path, steps=(10, 20, 30, 40))
    manifest = manifest_of(store, 20)
    manifest["step"] = 60  # the flip: the manifest's own checksum no longer matches
    write_manifest(store, 20, manifest, sign=False)
    save_step = 50
    store.save(Snapshot.capture({"w": torch.full((4,), 50.0)}), save_step, "periodic", {})
    kept = sorted(i.step for i in store.complete())
    assert kept == [30, 40, 50]  # retention counted the real checkpoints, not a step 60
    assert newest_loaded(store) == 50


def test_a_resigned_manifest_whose_step_is_not_its_directory_is_corrupt(tmp_path):
    store = make_store(tmp_path, steps=(10, 20))
    manifest = manifest_of(store, 20)
    manifest["step"] = 60
    write_manifest(store, 20, manifest)
    assert [i.step for i in store.complete()] == [10]
    assert newest_loaded(store) == 10 and corrupt_names(store) == ["000000020"]


MALFORMED = {
    "no size": lambda m: m["files"][DATA_FILE].pop("size"),
    "size is a string": lambda m: m["files"][DATA_FILE].update(size="12"),
    "size is negative": lambda m: m["files"][DATA_FILE].update(size=-1),
    "created not a number": lambda m: m.update(created="yesterday"),
    "created missing": lambda m: m.pop("created"),
    "a 400 digit metric": lambda m: m["metrics"].update(loss=10**400),
    "a metric not a number": lambda m: m["metrics"].update(loss="low"),
    "metrics a list": lambda m: m.update(metrics=[1]),
    "step is true": lambda m: m.update(step=True),
    "unknown reason": lambda m: m.update(reason="because"),
    "a file outside": lambda m: m["files"].update({"../../../etc/passwd": {"size": 1, CHECKSUM: "0" * 32}}),
    "a shard without sharded state": lambda m: m["files"].update({"shard-00000.bin": {"size": 1, CHECKSUM: "0" * 32}}),
    "a checksum that is not hex": lambda m: m["files"][STATE_FILE].update({CHECKSUM: "zz"}),
    "files missing": lambda m: m.pop("files"),
    "gpus a list": lambda m: m.update(gpus=[1]),
    "a gpu index not a number": lambda m: m.update(gpus={"x": {"samples": 1}}),
    "a gpu index of unicode digits": lambda m: m.update(gpus={"\u00b2": {"samples": 1}}),
    "a gpu figure not a number": lambda m: m.update(gpus={"0": {"peak_memory_mib": "much"}}),
    "a gpu name too long": lambda m: m.update(gpus={"0": {"name": "x" * 201}}),
}


@pytest.mark.parametrize("edit", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_resigned_manifest_is_set_aside_and_status_does_not_crash(tmp_path, edit, capsys):
    store = make_store(tmp_path, steps=(10, 20))
    manifest = manifest_of(store, 20)
    edit(manifest)
    write_manifest(store, 20, manifest)
    assert [i.step for i in store.complete()] == [10]
    assert newest_loaded(store) == 10 and corrupt_names(store) == ["000000020"]


def test_step_infinity_in_a_manifest_is_corrupt(tmp_path):
    store = make_store(tmp_path, steps=(10, 20))
    path = store.step_path(20) / MANIFEST_FILE
    path.write_text(path.read_text().replace('"step": 20', '"step": Infinity'))
    assert [i.step for i in store.complete()] == [10]


def test_status_reads_a_run_whose_checkpoints_are_malformed(tmp_path):
    """`hydra-preempt status` (run_standing) never crashes on a checkpoint directory: it reports what verifies."""
    store = make_store(tmp_path, steps=(10, 20, 30))
    RunLog(tmp_path).append("start", checkpoint_dir=str(store.directory))
    manifest = manifest_of(store, 30)
    manifest["metrics"]["loss"] = 10**400
    write_manifest(store, 30, manifest)
    (store.step_path(20) / MANIFEST_FILE).write_text('{"format": 2, "step": Infinity}')
    assert run_standing(tmp_path).checkpoint_step == 10


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(["step", "reason", "created", "metrics", "files", "sharded", "format", "extra"]),
    value=json_values,
)
def test_any_resigned_manifest_field_either_verifies_into_sane_values_or_is_corrupt(key, value):
    manifest = sign_manifest(
        {
            "format": 2,
            "step": 20,
            "reason": "periodic",
            "metrics": {"loss": 0.5},
            "created": 1.0,
            "files": {name: {"size": 1, CHECKSUM: "0" * 32} for name in (DATA_FILE, STATE_FILE)},
        }
    )
    manifest[key] = value
    try:
        signed = sign_manifest(manifest)
    except ValueError:  # NaN/inf: a manifest cannot even be signed with them
        return
    try:
        verified = verify_manifest(signed, "step-000000020")
    except CorruptCheckpointError:
        return
    info = checkpoint_info(Path("step-000000020"), verified)
    assert info.step == 20
    assert all(isinstance(v, float) for v in info.metrics.values()) and info.nbytes >= 0


# -- the state tree ---------------------------------------------------------------------------
def _deep_text(parsed, depth):
    """As JSON text: json.dumps itself could not nest this deep."""
    parsed["skeleton"]["t"] = "DEEP"
    return json.dumps(parsed).replace('"DEEP"', "[" * depth + "1" + "]" * depth).encode()


def _deep(parsed, depth):
    node: object = 1
    for _ in range(depth):
        node = [node]
    parsed["skeleton"]["t"] = node
    return parsed


def _huge_array(parsed):
    parsed["arrays"][0]["shape"] = [10**12]
    return parsed


def _empty(parsed, kind, dtype, shape):
    """An array of no bytes, at the end of the data: its layout checks pass."""
    last = parsed["arrays"][-1]
    parsed["arrays"].append(
        {"kind": kind, "dtype": dtype, "shape": shape, "offset": last["offset"] + last["nbytes"], "nbytes": 0}
    )
    return parsed


def _first_ref(parsed):
    return parsed["skeleton"]["w"]


STATE_EDITS = {
    "nested 100000 deep": lambda p: _deep_text(p, 100_000),
    "nested 150 deep": lambda p: _deep(p, 150),
    "an array of 10^12 elements": _huge_array,
    "an array of the wrong byte size": lambda p: (p["arrays"][0].update(nbytes=8), p)[1],
    "an index out of range": lambda p: (_first_ref(p).update({"__tensor__": 99}), p)[1],
    "an index of the wrong type": lambda p: (_first_ref(p).update({"__tensor__": "0"}), p)[1],
    "an index used twice": lambda p: (p["skeleton"].update(v={"__tensor__": 0}), p)[1],
    "a tensor index naming a numpy array": lambda p: (_first_ref(p).update({"__tensor__": 1}), p)[1],
    "a bad __dict__": lambda p: (p["skeleton"].update(d={"__dict__": [[1]]}), p)[1],
    "a __dict__ with an unhashable key": lambda p: (p["skeleton"].update(d={"__dict__": [[{"a": 1}, 2]]}), p)[1],
    "a __tuple__ of a number": lambda p: (p["skeleton"].update(t={"__tuple__": 3}), p)[1],
    "an unknown dtype": lambda p: (p["arrays"][0].update(dtype="complex1024"), p)[1],
    "a numpy object dtype": lambda p: (p["arrays"][1].update(dtype="|O"), p)[1],
    "arrays not a list": lambda p: (p.update(arrays={}), p)[1],
    "no skeleton": lambda p: (p.pop("skeleton"), p)[1],
    "not json": lambda p: b"\xff\xfe{",
    "an empty array whose strides overflow": lambda p: _empty(p, "torch", "float32", [0, 2**62, 2**62]),
    "an empty array of 70 dimensions": lambda p: _empty(p, "numpy", "<f4", [0] + [1] * 69),
}


@pytest.mark.parametrize("edit", STATE_EDITS.values(), ids=STATE_EDITS.keys())
def test_a_resigned_state_that_does_not_decode_is_corrupt_and_the_previous_one_loads(tmp_path, edit):
    store = make_store(tmp_path, steps=(10, 20))
    resign_state(store, 20, edit)
    assert newest_loaded(store) == 10
    assert corrupt_names(store) == ["000000020"]


@settings(max_examples=200, deadline=None)
@given(skeleton=json_values)
def test_any_skeleton_either_decodes_or_is_corrupt(tmp_path_factory, skeleton):
    store = make_store(tmp_path_factory.mktemp("s"), steps=(10,))
    resign_state(store, 10, lambda p: (p.update(skeleton=skeleton), p)[1])
    path = store.step_path(10)
    with contextlib.suppress(CorruptCheckpointError):  # anything else (a crash, a hang) fails the test
        read_checkpoint_files(path, read_manifest(path))


# -- a closed world ---------------------------------------------------------------------------
def test_a_fifo_as_manifest_does_not_hang_a_resume(tmp_path):
    store = make_store(tmp_path, steps=(10, 20))
    (store.step_path(20) / MANIFEST_FILE).unlink()
    os.mkfifo(store.step_path(20) / MANIFEST_FILE)
    assert newest_loaded(store) == 10


@pytest.mark.parametrize("name", [STATE_FILE, DATA_FILE])
def test_a_file_linked_to_a_device_is_not_read(tmp_path, name):
    store = make_store(tmp_path, steps=(10, 20))
    (store.step_path(20) / name).unlink()
    (store.step_path(20) / name).symlink_to("/dev/zero")
    assert newest_loaded(store) == 10


def test_a_symlink_to_a_file_outside_is_not_loaded_even_with_the_right_bytes(tmp_path):
    """The attacker's file has exactly the bytes the manifest lists: still, only files inside are read."""
    store = make_store(tmp_path, steps=(10, 20))
    outside = tmp_path / "outside.bin"
    (store.step_path(20) / DATA_FILE).rename(outside)
    (store.step_path(20) / DATA_FILE).symlink_to(outside)
    assert newest_loaded(store) == 10


def test_a_data_file_that_is_a_directory_is_corrupt(tmp_path):
    store = make_store(tmp_path, steps=(10, 20))
    (store.step_path(20) / DATA_FILE).unlink()
    (store.step_path(20) / DATA_FILE).mkdir()
    assert newest_loaded(store) == 10


def test_a_symlinked_checkpoint_directory_is_not_a_checkpoint(tmp_path):
    store = make_store(tmp_path, steps=(10,))
    elsewhere = make_store(tmp_path / "other", steps=(30,))
    (store.directory / "step-000000030").symlink_to(elsewhere.step_path(30))
    assert [i.step for i in store.complete()] == [10]
    assert newest_loaded(store) == 10


def test_state_deeper_than_the_limit_is_refused_on_save(tmp_path):
    from hydra_preempt.errors import UnsupportedStateError

    node: object = 1
    for _ in range(120):
        node = [node]
    with pytest.raises(UnsupportedStateError, match="nested more than"):
        Snapshot.capture({"deep": node})
