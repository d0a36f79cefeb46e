"""Sharded state (FSDP2 over gloo, CPU): every rank writes its own part; exact resume; resharding; no pickle."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import xxhash

from hydra_preempt.checkpoint.layout import CHECKSUM, MANIFEST_FILE, SHARDS_METADATA, sign_manifest
from hydra_preempt.outcome import ExitCode
from hydra_preempt.rundir import RunHistory
from tests.e2e.helpers import ROOT
from tests.integration.test_multi_rank import finish, free_port, start_ranks, stop_rank_1_after

pytestmark = pytest.mark.slow

FSDP = ["trainer.max_steps=160", "trainer.step_sleep=0.01", "checkpoint.every_steps=50", "trainer.parallel=fsdp"]


def checkpoints(run_dir):
    return sorted((run_dir / "checkpoints").glob("step-*"))


def test_fsdp2_every_rank_writes_its_shard_and_a_signal_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    codes, out = finish(start_ranks(reference, FSDP))
    assert codes == [0, 0], out

    run_dir = tmp_path / "run"
    procs = start_ranks(run_dir, FSDP)
    codes, out = stop_rank_1_after(run_dir, procs, 70)
    assert codes == [ExitCode.REQUEUE, ExitCode.REQUEUE], out
    reasons = []
    for saved in checkpoints(run_dir):  # periodic ones written in the background, the stop's at the boundary
        manifest = json.loads((saved / MANIFEST_FILE).read_text())
        reasons.append(manifest["reason"])
        assert manifest["sharded"] == ["model", "optimizer"]
        assert {"shard-00000.bin", "shard-00001.bin", SHARDS_METADATA} <= set(manifest["files"])
        for name, entry in manifest["files"].items():  # each rank's checksum, as its writer computed it
            assert xxhash.xxh3_128_hexdigest((saved / name).read_bytes()) == entry[CHECKSUM]
    assert reasons == ["periodic", "preempt"], reasons
    state = json.loads((saved / "state.json").read_text())
    assert set(state["skeleton"]["objects"]) == {"scheduler"}  # sharded objects are not gathered to rank 0

    codes, out = finish(start_ranks(run_dir, FSDP))
    assert codes == [0, 0], out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["params_sha256"] == json.loads((reference / "result.json").read_text())["params_sha256"]
    assert result["resumed_from"] == RunHistory.read(run_dir).stops[0]["step"] > 0


def run_worker(run_dir, ranks, steps=3, env=None, expect=0):
    """tests/integration/fsdp_worker.py with `ranks` torchrun ranks (0: a plain process, no FSDP)."""
    out = run_dir.parent / f"{run_dir.name}-{ranks}.json"
    worker = ["-m", "tests.integration.fsdp_worker", str(run_dir), str(steps), str(out)]
    if ranks:
        args = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ranks}",
            f"--master-port={free_port()}",
            *worker,
        ]
    else:
        args = [sys.executable, *worker]
    done = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )
    assert done.returncode == expect, done.stdout + done.stderr
    return (json.loads(out.read_text()) if expect == 0 else None), done.stdout + done.stderr


@pytest.mark.parametrize("saved_by, loaded_by", [(2, 1), (1, 2), (2, 4), (2, 0)])
def test_a_checkpoint_of_n_ranks_loads_into_m(tmp_path, saved_by, loaded_by):
    written, _ = run_worker(tmp_path / "run", saved_by)
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    read, output = run_worker(tmp_path / "again", loaded_by)  # already at its last step: restores only
    assert read == written  # every full parameter and AdamW moment, bit for bit
    assert len(read) == 4 + 4 * 3  # 4 parameters; step, exp_avg, exp_avg_sq of each
    assert "resharded exactly" in output and "trajectory will differ" in output


@pytest.mark.parametrize("every", ["0", "2"], ids=["final-save", "background-save"])
def test_a_rank_that_cannot_write_stops_every_rank_and_the_previous_checkpoint_stands(tmp_path, every):
    run_dir = tmp_path / "run"
    env = {"FSDP_WORKER_EVERY": every}
    written, _ = run_worker(run_dir, 2, steps=2, env=env)
    _, output = run_worker(run_dir, 2, steps=4, env={**env, "FSDP_WORKER_RANK_WITHOUT_WRITES": "1"}, expect=1)
    assert "rank 0: failed at step 4: " in output and "rank 1: failed at step 4: " in output, output
    assert "File too large" in output and "checkpoint step 2 is intact" in output, output
    assert [c.name for c in (run_dir / "checkpoints").iterdir() if "step-" in c.name] == ["step-000000002"]
    again, _ = run_worker(run_dir, 2, steps=2, env=env)  # step 2 still loads, bit for bit
    assert again == written


def test_a_pickle_planted_in_a_checkpoint_is_never_run(tmp_path):
    """A re-signed shards.json that is a pickle: set aside as corrupt, never unpickled; the previous checkpoint loads."""
    run_worker(tmp_path / "run", 1, steps=2)
    run_worker(tmp_path / "run", 1, steps=4)  # a second checkpoint, at step 4
    newest = checkpoints(tmp_path / "run")[-1]
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Payload())
    (newest / SHARDS_METADATA).write_bytes(payload)
    (newest / ".metadata").write_bytes(payload)  # what DCP's own reader would unpickle
    manifest = json.loads((newest / MANIFEST_FILE).read_text())
    manifest["files"][SHARDS_METADATA] = {"size": len(payload), CHECKSUM: xxhash.xxh3_128_hexdigest(payload)}
    (newest / MANIFEST_FILE).write_text(json.dumps(sign_manifest(manifest)))

    _, output = run_worker(tmp_path / "run", 1, steps=4)
    assert not marker.exists()
    assert "does not decode" in output and "falling back to the previous one" in output
    assert [c.name for c in checkpoints(tmp_path / "run")] == ["step-000000002", "step-000000004"]  # 4 saved anew
    assert any(p.name.startswith("corrupt-step-000000004") for p in (tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("ranks", [2, 0])
def test_export_writes_the_full_weights_as_safetensors(tmp_path, ranks):
    """From a sharded checkpoint (2 ranks) and from a single process's: the same full tensors."""
    import hashlib

    from safetensors.torch import load_file

    written, _ = run_worker(tmp_path / "run", ranks)
    out = tmp_path / "model.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "hydra_preempt.cli", "export", str(tmp_path / "run"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "from the checkpoint of step 3" in done.stdout
    assert "Warning" not in done.stderr, done.stderr  # DCP's "assuming the intent ... single process" is no news
    tensors = load_file(str(out))
    digests = {
        f"model.{k}": hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, v in tensors.items()
    }
    assert digests == {k: v for k, v in written.items() if k.startswith("model.")}


def test_export_of_a_missing_object_or_step_is_one_line(tmp_path):
    run_worker(tmp_path / "run", 0)
    for extra, message in (
        (["--object", "nope"], "holds no object 'nope'"),
        (["--object", "model.weight.more"], "'model' holds no 'weight'"),
        (["--step", "99"], "no checkpoint of step 99 in"),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "hydra_preempt.cli",
                "export",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "x"),
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_rank_killed_mid_save_is_the_loss_of_a_peer_and_the_run_restarts(tmp_path):
    """Rank 1 of a 2-rank FSDP2 run is SIGKILLed as the final save writes its shard (a host OOM kill):
    rank 0 ends like a preemption, class peer_lost (was user_exception, exit 1), and a rerun finishes."""
    run_dir = tmp_path / "run"
    port = str(free_port())
    worker = ["-m", "tests.integration.fsdp_worker", str(run_dir), "3", str(tmp_path / "out.json")]
    procs = [
        subprocess.Popen(
            [sys.executable, *worker],
            cwd=ROOT,
            env={
                **os.environ,
                **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2"},
                "FSDP_WORKER_RANK_KILLED_IN_SAVE": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [ExitCode.REQUEUE, -9], outputs
    stop = RunHistory.read(run_dir).stops[-1]
    assert stop["failure"] == "peer_lost" and stop["restart_reason"] == "peer_lost: restart (attempt 1/3)", stop
    assert checkpoints(run_dir) == []  # the save never completed: nothing that looks complete

    run_worker(run_dir, 2, steps=3)  # the restart
    assert [c.name for c in checkpoints(run_dir)] == ["step-000000003"]
