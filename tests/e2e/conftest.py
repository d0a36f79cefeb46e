"""The real SLURM cluster the end-to-end tests run against (tests/cluster/slurm-cluster.sh): one start for the
whole run, a partition per pytest-xdist worker."""

import fcntl
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
    # One cluster for the whole run: every xdist worker asks for the same shape (a partition of
    # helpers.NODES_PER_WORKER nodes each); the first starts it, the others find it up.
    nodes = helpers.NODES_PER_WORKER * helpers.WORKERS
    with open("/run/hydra-preempt-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run(
            ["bash", str(SCRIPT), "up", "--nodes", str(nodes), "--partitions", str(helpers.WORKERS)],
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert done.returncode == 0, f"starting the test cluster failed:\n{done.stdout}\n{done.stderr}"
    helpers.cancel_all_jobs()  # a partition left busy by an earlier run
    yield SCRIPT
    helpers.cancel_all_jobs()


@pytest.fixture
def preempt_mode(slurm_cluster, request):
    """The PreemptMode a test's jobs are preempted with (parametrize with indirect=True): each mode has its
    own QoS (helpers.QOS), so that tests of both modes run at once."""
    helpers.cancel_all_jobs()
    return request.param
