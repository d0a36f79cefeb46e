"""Hostile edits of sharded checkpoints (FSDP2 over 2 gloo ranks), each re-signed with the project's own
manifest helpers: export refuses or falls back without changing the run; a resume sets each aside and
ends identical to an uninterrupted run; export reads the run directory it is given."""

import json
import os
import shutil

import pytest
import xxhash

from hydra_preempt.checkpoint.layout import CHECKSUM, MANIFEST_FILE, SHARDS_METADATA, sign_manifest
from hydra_preempt.cli import main
from tests.integration.test_sharded import run_worker

pytestmark = pytest.mark.slow

STEPS = 14  # step 1 stays intact; every later checkpoint gets one edit
SAVE_EVERY_STEP = {
    "FSDP_WORKER_EVERY": "1",
    "FSDP_WORKER_CHECKPOINT": json.dumps({"keep_last": 20, "async_save": False}),
}
WEIGHT = "model.0.weight"  # (10, 6): rows 0-4 in rank 0's file, rows 5-9 in rank 1's


def resign(step_dir):
    """What a hostile editor does after changing files: recompute every listed file's size and checksum."""
    manifest = json.loads((step_dir / MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        data = (step_dir / name).read_bytes()
        manifest["files"][name] = {"size": len(data), CHECKSUM: xxhash.xxh3_128_hexdigest(data)}
    (step_dir / MANIFEST_FILE).write_text(json.dumps(sign_manifest(manifest)))


def edit_metadata(change):
    def edit(step_dir):
        document = json.loads((step_dir / SHARDS_METADATA).read_text())
        change(document, step_dir)
        (step_dir / SHARDS_METADATA).write_text(json.dumps(document))

    return edit


def rank1_chunk(document):
    """The chunk of WEIGHT rank 1 wrote, and its storage entry."""
    chunk = next(c for c in document["state_dict_metadata"][WEIGHT]["chunks"] if c["offsets"][0] > 0)
    entry = next(e for e in document["storage_data"] if e[0]["fqn"] == WEIGHT and e[0]["offset"] == chunk["offsets"])
    return chunk, entry


def drop(document, _):
    chunk, entry = rank1_chunk(document)
    document["state_dict_metadata"][WEIGHT]["chunks"].remove(chunk)
    document["storage_data"].remove(entry)


def size_zero(document, _):
    chunk, entry = rank1_chunk(document)
    chunk["sizes"][0] = 0
    entry[1]["length"] = 0


def overlap(document, _):
    chunk, entry = rank1_chunk(document)
    chunk["offsets"][0] -= 1
    entry[0]["offset"] = chunk["offsets"]


def dtype(name):
    def change(document, _):
        document["state_dict_metadata"][WEIGHT]["properties"]["dtype"] = name

    return change


def unlisted(document, step_dir):
    shutil.copy(step_dir / "shard-00001.bin", step_dir / "shard-00007.bin")
    rank1_chunk(document)[1][1]["relative_path"] = "shard-00007.bin"


def offset(value):
    def change(document, step_dir):
        entry = rank1_chunk(document)[1]
        entry[1]["offset"] = (step_dir / "shard-00001.bin").stat().st_size if value is None else value

    return change


def shape(rows):
    def change(document, _):
        document["state_dict_metadata"][WEIGHT]["size"][0] = rows

    return change


def missing(document, _):
    del document["state_dict_metadata"]["model.0.bias"]
    document["storage_data"] = [e for e in document["storage_data"] if e[0]["fqn"] != "model.0.bias"]


def swap(step_dir):
    """Rank 0's and rank 1's files swapped, padded to equal size."""
    a, b = (step_dir / "shard-00000.bin").read_bytes(), (step_dir / "shard-00001.bin").read_bytes()
    n = max(len(a), len(b))
    (step_dir / "shard-00000.bin").write_bytes(b.ljust(n, b"\0"))
    (step_dir / "shard-00001.bin").write_bytes(a.ljust(n, b"\0"))


EDITS = {  # step -> (what, edit)
    2: ("rank 1's chunk dropped", edit_metadata(drop)),
    3: ("rank 1's chunk of size 0", edit_metadata(size_zero)),
    4: ("rank 1's chunk overlapping rank 0's", edit_metadata(overlap)),
    5: ("int32 for float32", edit_metadata(dtype("torch.int32"))),
    6: ("complex32 for float32", edit_metadata(dtype("torch.complex32"))),
    7: ("qint32 for float32", edit_metadata(dtype("torch.qint32"))),
    8: ("an unlisted shard file", edit_metadata(unlisted)),
    9: ("shard files swapped", swap),
    10: ("an item past the end of its file", edit_metadata(offset(None))),
    11: ("an offset of 10**400", edit_metadata(offset(10**400))),
    12: ("a shape of 2**40 x 6", edit_metadata(shape(2**40))),
    13: ("a shape of 10**400 x 6", edit_metadata(shape(10**400))),
    14: ("a tensor's entry missing", edit_metadata(missing)),
}


def listing(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


def export(capsys, run_dir, out, *extra):
    code = main(["export", str(run_dir), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_hostile_edit_is_refused_by_export_and_set_aside_by_a_resume(tmp_path, capsys):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    uninterrupted, _ = run_worker(run_dir, 2, steps=STEPS, env=SAVE_EVERY_STEP)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [f"step-{s:09d}" for s in range(1, STEPS + 1)]
    assert export(capsys, run_dir, tmp_path / "step1.safetensors", "--step", "1")[0] == 0
    step1 = load_file(str(tmp_path / "step1.safetensors"))
    for step, (_, edit) in EDITS.items():
        edit(checkpoints / f"step-{step:09d}")
        resign(checkpoints / f"step-{step:09d}")

    before = listing(run_dir)
    for step, (what, _) in EDITS.items():  # a named damaged step: one line, exit 2, nothing changed
        code, _, err = export(capsys, run_dir, tmp_path / f"{step}.safetensors", "--step", str(step))
        assert code == 2 and "is not a usable checkpoint" in err and err.count("\n") == 1, (what, err)
        assert len(err) < 400, (what, err)
    code, out, err = export(capsys, run_dir, tmp_path / "newest.safetensors")  # the newest good one: step 1
    assert code == 0 and "from the checkpoint of step 1" in out, err
    exported = load_file(str(tmp_path / "newest.safetensors"))
    assert exported.keys() == step1.keys() and all((exported[k] == step1[k]).all() for k in step1)
    assert listing(run_dir) == before  # a read-only command renamed nothing
    assert not list(tmp_path.glob(".*.tmp-*"))

    resumed, output = run_worker(run_dir, 2, steps=STEPS, env=SAVE_EVERY_STEP)
    assert resumed == uninterrupted  # fell back to step 1 and trained on: every tensor bit for bit
    set_aside = sorted(p.name[len("corrupt-") :][:14] for p in checkpoints.glob("corrupt-step-*"))
    assert set_aside == [f"step-{s:09d}" for s in EDITS], (set_aside, output)
    assert "resumed from step-000000001" in output, output

    # No tampering: a float32 checkpoint into a bfloat16 model is refused before loading, naming the tensors
    bf16 = {**SAVE_EVERY_STEP, "FSDP_WORKER_DTYPE": "bfloat16"}
    _, output = run_worker(run_dir, 2, steps=STEPS, env=bf16, expect=1)  # torchrun's code for a failed rank
    assert "rank 0: failed at step 0: " in output and "(exit code 2)" in output, output
    assert f"{WEIGHT} (torch.float32 in the checkpoint, torch.bfloat16 in this run)" in output, output
    cast = {**bf16, "FSDP_WORKER_CHECKPOINT": json.dumps({"keep_last": 20, "async_save": False, "cast_dtype": True})}
    _, output = run_worker(run_dir, 2, steps=STEPS, env=cast)  # opted in: loads, cast
    assert f"resumed from step-{STEPS:09d}" in output, output


def test_export_takes_the_checkpoints_of_the_run_directory_it_is_given(tmp_path, capsys):
    original = tmp_path / "original"
    run_worker(original, 0, steps=3, env=SAVE_EVERY_STEP)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000000003")  # the copy's newest is step 2, the original's 3
    code, out, err = export(capsys, copy, tmp_path / "a.safetensors")
    assert code == 0 and "from the checkpoint of step 2" in out, err
    original.rename(tmp_path / "moved-away")
    code, out, err = export(capsys, copy, tmp_path / "b.safetensors")
    assert code == 0 and "from the checkpoint of step 2" in out, err

    refusals = [
        (["--step", "123"], "no checkpoint of step 123 in", "its checkpoints: [1, 2]"),
        (["--step", "-5"], "a step is a number >= 0", ""),
    ]
    for extra, message, more in refusals:
        code, _, err = export(capsys, copy, tmp_path / "c.safetensors", *extra)
        assert code == 2 and message in err and more in err and err.count("\n") == 1, err
    (tmp_path / "file").write_text("")
    for out, message in (
        (tmp_path, "is a directory"),
        (tmp_path / "a.safetensors", "exists; pass --force"),
        (tmp_path / "file" / "x", "is not a directory"),
        (tmp_path / "nowhere" / "x", "does not exist"),
        ("/proc/x", "cannot be written"),
    ):
        code, _, err = export(capsys, copy, out)
        assert code == 2 and message in err and err.count("\n") == 1, (out, err)
    assert not (tmp_path / "nowhere").exists()
    code, out, err = export(capsys, copy, tmp_path / "a.safetensors", "--force")
    assert code == 0, err

    damaged = copy / "checkpoints" / "step-000000002" / "tensors.bin"  # one flipped byte in the newest
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    before = listing(copy)
    code, out, err = export(capsys, copy, tmp_path / "a.safetensors", "--force")
    assert code == 0 and "from the checkpoint of step 1" in out, err
    assert listing(copy) == before  # reported, not renamed
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o500)
        code, _, err = export(capsys, copy, tmp_path / "locked" / "x")
        assert code == 2 and "cannot be written" in err, err
