"""Two real processes training with DDP over gloo: a signal to one rank stops both at the same step."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hydra_preempt.outcome import ExitCode
from hydra_preempt.rundir import read_events
from tests.e2e.helpers import ROOT, last_step

pytestmark = pytest.mark.slow

TRAIN = ["trainer.max_steps=200", "trainer.step_sleep=0.01", "checkpoint.every_steps=50"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(run_dir, overrides=TRAIN):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.integration.ddp_worker", str(run_dir), *overrides],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def finish(procs, timeout=180):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs


def stop_rank_1_after(run_dir, procs, step):
    """SIGTERM to rank 1 alone once training passed `step`; the exit codes and outputs of all ranks."""
    deadline = time.monotonic() + 120
    while last_step(run_dir) < step and time.monotonic() < deadline:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    return finish(procs)


def test_signal_to_one_rank_stops_all_and_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    codes, out = finish(start_ranks(reference))
    assert codes == [0, 0], out

    run_dir = tmp_path / "run"
    procs = start_ranks(run_dir)
    codes, out = stop_rank_1_after(run_dir, procs, 70)
    assert codes == [ExitCode.REQUEUE, ExitCode.REQUEUE], out
    steps = {line.split()[-1] for o in out for line in o.splitlines() if line.startswith("rank ")}
    assert len(steps) == 1, f"ranks stopped at different steps: {out}"
    stop = [e for e in read_events(run_dir) if e["event"] == "stop"]
    assert len(stop) == 1 and stop[0]["checkpoint_step"] == stop[0]["step"] >= 70  # one log entry, rank 0's

    manifest = json.loads(sorted((run_dir / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert len(manifest["skeleton"]["ranks"]) == 2  # every rank's RNG and data position

    codes, out = finish(start_ranks(run_dir))
    assert codes == [0, 0], out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["params_sha256"] == json.loads((reference / "result.json").read_text())["params_sha256"]
    assert result["resumed_from"] == stop[0]["step"]


def test_ranks_given_different_checkpoint_directories_are_refused_on_every_rank(tmp_path):
    """A per-rank path in the config (here through the environment): one line, exit 2, on both ranks,
    before anything is written; no probe file left behind."""
    override = f"checkpoint.dir={tmp_path}/ckpt-${{oc.env:RANK}}"
    codes, out = finish(start_ranks(tmp_path / "run", [*TRAIN, override]))
    assert codes == [2, 2], out
    for output in out:
        assert "the ranks were given different run or checkpoint directories" in output, output
        assert "Traceback" not in output
    assert not list(tmp_path.rglob(".shared-probe-*")) and not (tmp_path / "ckpt-0").exists()
