"""`hydra-preempt validate --slurm` against the real cluster: its settings read, its tiny job TERMed,
requeued by itself and run again with SLURM_RESTART_COUNT=1."""

import json
import subprocess
import sys

import pytest

from . import helpers

pytestmark = pytest.mark.slow

SLURM_ROWS = [
    "slurm: QoS",
    "slurm: GraceTime",
    "slurm: PreemptMode",
    "slurm: KillWait",
    "slurm: JobRequeue",
    "slurm: signal to step",
    "slurm: batch script",
    "slurm: self-requeue",
    "slurm: restart count",
]


def test_validate_slurm_passes_on_the_test_cluster(slurm_cluster, tmp_path):
    helpers.cancel_all_jobs()  # the partition free for the test job
    done = subprocess.run(
        [sys.executable, "-m", "hydra_preempt.cli", "validate", "--slurm", "--json"]
        + ["--qos", "preemptible", "--account", helpers.ACCOUNT, "--partition", helpers.PARTITION]
        + ["--checkpoint-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(done.stdout)
    rows = {r["name"]: r for r in report["rows"]}
    assert [name for name in rows if name.startswith("slurm:")] == SLURM_ROWS, done.stderr
    for name in SLURM_ROWS:
        assert rows[name]["status"] == "PASS", rows[name]
    assert rows["slurm: GraceTime"]["figures"]["grace_s"] > 0
    assert "reached the srun step and not the batch script" in rows["slurm: batch script"]["reason"]
    assert rows["grace period fit"]["status"] == "SKIP"  # no --state-gb given
    assert done.returncode == 0, report
    assert list(tmp_path.iterdir()) == []  # the job's script and log are removed with the work directory
