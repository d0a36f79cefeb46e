"""hydra/launcher=preempt_local: `python train.py -m ...` as a user runs it, with real processes and signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_preempt.rundir import read_events

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 120
BASE = [f"trainer.max_steps={STEPS}", "checkpoint.every_steps=40"]


def sweep(sweep_dir: Path, *overrides: str, launcher: str = "preempt_local", wait: bool = True) -> subprocess.Popen:
    args = [
        sys.executable,
        "train.py",
        "-m",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep_dir}",
        *BASE,
        *overrides,
    ]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def status(sweep_dir: Path) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "hydra_preempt.cli", "status", str(sweep_dir), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def wait_for_start(run_dir: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        starts = [e for e in read_events(run_dir) if e["event"] == "start"]
        metrics = run_dir / "metrics.jsonl"
        if starts and metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            return starts[-1]
        time.sleep(0.1)
    raise TimeoutError(f"no training in {run_dir} after {timeout} s")


def reference_sha(tmp_path: Path, lr: str) -> str:
    run_dir = tmp_path / f"reference-{lr}"
    subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *BASE, f"optim.lr={lr}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return json.loads((run_dir / "result.json").read_text())["params_sha256"]


def test_plugin_is_discovered():
    done = subprocess.run(
        [sys.executable, "train.py", "--info", "plugins"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "PreemptLauncher" in done.stdout


def test_local_sweep_survives_a_signal_and_a_rerun_submits_nothing(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = sweep(sweep_dir, "optim.lr=0.01,0.001", "trainer.step_sleep=0.03")
    start = wait_for_start(sweep_dir / "0")
    os.kill(start["pid"], signal.SIGTERM)  # the training process of job #0, mid-run
    rc, out = finish(proc)
    assert rc == 0, out

    rows = status(sweep_dir)
    assert [r["run"] for r in rows] == ["finished", "finished"]
    assert rows[0]["preemptions"] == 1 and rows[0]["starts"] == 2 and rows[1]["starts"] == 1
    assert rows[0]["result"]["resumed_from"] > 0
    assert rows[0]["result"]["params_sha256"] == reference_sha(tmp_path, "0.01")
    assert rows[1]["result"]["params_sha256"] == reference_sha(tmp_path, "0.001")

    manifest_before = (sweep_dir / "sweep_manifest.json").read_text()
    rc, out = finish(sweep(sweep_dir, "optim.lr=0.01,0.001", "trainer.step_sleep=0.03"))
    assert rc == 0, out
    assert "0 job(s) to submit, 2 finished" in out
    assert (sweep_dir / "sweep_manifest.json").read_text() == manifest_before
    assert [r["starts"] for r in status(sweep_dir)] == [2, 1]


def test_rerun_resumes_an_unfinished_job_from_its_checkpoint(tmp_path):
    """Job #1 is cancelled (SIGINT: saved, not requeued); the same command again finishes only it."""
    sweep_dir = tmp_path / "sweep"
    proc = sweep(sweep_dir, "optim.lr=0.01,0.001", "trainer.step_sleep=0.03", "hydra.launcher.array_parallelism=1")
    start = wait_for_start(sweep_dir / "0")
    os.kill(start["pid"], signal.SIGINT)
    rc, out = finish(proc)
    assert rc != 0 and "cancelled" in out  # Hydra reports the job that did not finish
    assert status(sweep_dir)[0]["run"] == "cancelled"
    assert status(sweep_dir)[1]["run"] == "finished"

    rc, out = finish(sweep(sweep_dir, "optim.lr=0.01,0.001", "trainer.step_sleep=0.03"))
    assert rc == 0, out
    assert "1 job(s) to submit, 1 finished" in out
    rows = status(sweep_dir)
    assert [r["run"] for r in rows] == ["finished", "finished"]
    assert rows[0]["result"]["resumed_from"] > 0 and rows[1]["starts"] == 1
    assert rows[0]["result"]["params_sha256"] == reference_sha(tmp_path, "0.01")


def test_submit_and_return_then_status(tmp_path):
    sweep_dir = tmp_path / "sweep"
    rc, out = finish(sweep(sweep_dir, "optim.lr=0.01,0.001", "hydra.launcher.wait=false"), timeout=60)
    assert rc == 0, out
    assert "hydra-preempt status" in out
    manifest = json.loads((sweep_dir / "sweep_manifest.json").read_text())
    assert [j["overrides"][-1] for j in manifest["jobs"]] == ["optim.lr=0.01", "optim.lr=0.001"]
    assert all(j["job_id"] for j in manifest["jobs"])
    deadline = time.monotonic() + 180
    while any(r["run"] != "finished" for r in status(sweep_dir)):
        assert time.monotonic() < deadline, status(sweep_dir)
        time.sleep(0.5)
    table = subprocess.run(
        [sys.executable, "-m", "hydra_preempt.cli", "status", str(sweep_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert table.splitlines()[0].split()[:3] == ["#", "job", "id"]
    assert "finished" in table and "optim.lr=0.001" in table


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+hydra.launcher.colour=red"], "unknown key(s) hydra.launcher.colour"),
        (["hydra.launcher.signal=KILL"], "signal must be one of"),
        (["hydra.launcher.timeout_min=1", "hydra.launcher.signal_lead_s=90"], "signal_lead_s (90) must be shorter"),
        (["hydra.launcher.max_preemptions=-1"], "max_preemptions must be an integer >= 0"),
        (["+hydra.launcher.sbatch_args.x_y=1"], "'x_y' is not an sbatch option name"),
        (["hydra.launcher.cluster=aws"], "cluster must be 'slurm' or 'local'"),
        (["signals.timeout=HUP"], "the app's signals.timeout=HUP"),
    ],
)
def test_bad_launcher_settings_are_refused_before_anything_runs(tmp_path, overrides, message):
    sweep_dir = tmp_path / "sweep"
    rc, out = finish(sweep(sweep_dir, "optim.lr=0.01", *overrides), timeout=60)
    assert rc == 2, out
    assert message in out and "Traceback" not in out
    assert not (sweep_dir / "sweep_manifest.json").exists() and not (sweep_dir / "0").exists()


def test_a_sweep_directory_of_another_sweep_is_refused(tmp_path):
    sweep_dir = tmp_path / "sweep"
    rc, out = finish(sweep(sweep_dir, "optim.lr=0.01", "trainer.max_steps=20"))
    assert rc == 0, out
    before = (sweep_dir / "0" / "result.json").read_text()
    rc, out = finish(sweep(sweep_dir, "optim.lr=0.5", "trainer.max_steps=20"), timeout=60)
    assert rc == 2 and "belongs to a different sweep" in out and "optim.lr=0.5" in out, out
    assert (sweep_dir / "0" / "result.json").read_text() == before


def test_status_of_a_directory_that_is_no_sweep(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hydra_preempt.cli", "status", str(tmp_path)], capture_output=True, text=True
    )
    assert (
        done.returncode == 2
        and "is neither a sweep (no sweep_manifest.json" in done.stderr
        and "Traceback" not in done.stderr
    )
