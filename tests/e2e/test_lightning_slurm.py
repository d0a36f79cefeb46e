"""A Lightning program of 2 ranks on two nodes of the test cluster (srun, DDP over gloo) under
hydra_preempt.lightning.fit, preempted by the scheduler twice mid-epoch: it requeues itself (CANCEL
mode), resumes and ends with the parameters of a plain, uninterrupted `trainer.fit` of the same program
(Lightning's own launch of its 2 processes, on this host). One rank, stopped twice, is
tests/integration/test_lightning.py (and through the Hydra launcher's local jobs); REQUEUE mode adds nothing Lightning-specific
(tests/e2e/test_slurm_preemption.py; both modes, 1 rank: benchmarks/framework_requeue.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from . import helpers

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_a_two_rank_lightning_job_preempted_twice_ends_as_plain_lightning(tmp_path, preempt_mode, request):
    ranks = 2
    reference_dir = tmp_path / "plain"
    reference = subprocess.Popen(  # meanwhile, on this host
        [sys.executable, "-m", "tests.e2e.lightning_ddp", str(reference_dir), str(ranks), "--plain"],
        cwd=helpers.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = tmp_path / "run"
    command = f"STEP_SLEEP=0.1 srun {sys.executable} -m tests.e2e.lightning_ddp {run_dir} {ranks}"
    job_id = helpers.submit_script(tmp_path, command, preempt_mode, nodes=ranks)
    # of 48, 16 an epoch: mid-epoch, in the first and in the second
    helpers.preempted_at_each_and_finished(job_id, run_dir, (12, 28), tmp_path / "job.log")
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]
    expected, got = torch.load(reference_dir / "params.pt"), torch.load(run_dir / "params.pt")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    helpers.record(request.node.name, run_dir)
