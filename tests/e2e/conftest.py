"""The real single-node SLURM cluster the end-to-end tests run against."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from . import helpers

SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "slurm-cluster.sh"


def _why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster needs root (it installs SLURM with apt and starts its daemons)"
    if not shutil.which("apt-get") and not shutil.which("slurmctld") and not Path("/usr/sbin/slurmctld").exists():
        return "no apt-get to install SLURM, and SLURM is not installed"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _why_no_cluster()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"end-to-end tests must run in CI: {reason}")
        pytest.skip(reason)
    done = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"starting the test cluster failed:\n{done.stdout}\n{done.stderr}"
    yield SCRIPT
    helpers.cancel_all_jobs()


@pytest.fixture
def preempt_mode(slurm_cluster, request):
    """Switch the cluster's PreemptMode for one test (parametrize with indirect=True)."""
    mode = request.param
    helpers.cancel_all_jobs()
    done = subprocess.run(["bash", str(slurm_cluster), "mode", mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return mode


def pytest_terminal_summary(terminalreporter):
    if helpers.MEASUREMENTS:
        terminalreporter.section("preemption measurements (end-to-end, real SLURM)")
        for line in helpers.measurement_lines():
            terminalreporter.write_line(line)
