"""A Lightning program of 2 ranks on two nodes of the test cluster (srun, DDP over gloo) under
hydra_preempt.lightning.fit, preempted by the scheduler twice mid-epoch: it requeues itself (CANCEL
mode), resumes and ends with the parameters of a plain, uninterrupted `trainer.fit` of the same program
(Lightning's own launch of its 2 processes, on this host). One rank, stopped twice, is
tests/integration/test_lightning.py (and through the Hydra launcher's local jobs); REQUEUE mode adds nothing Lightning-specific
(tests/e2e/test_slurm_preemption.py; both modes, 1 rank: benchmarks/lightning_requeue.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hydra_preempt.slurm.commands import slurm_command

from . import helpers
from .helpers import stops

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
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes={ranks} --ntasks-per-node=1 --cpus-per-task=2\n"
        "#SBATCH --requeue --open-mode=append\n"
        f"cd {helpers.ROOT}\n"
        f"STEP_SLEEP=0.1 srun {sys.executable} -m tests.e2e.lightning_ddp {run_dir} {ranks}\n"
    )
    args = ["sbatch", "--parsable", "-A", helpers.ACCOUNT, "-q", helpers.QOS[preempt_mode], "-p", helpers.PARTITION]
    log = tmp_path / "job.log"
    job_id = slurm_command([*args, "-o", str(log), str(script)]).strip().split(";")[0]
    for at_step in (12, 28):  # of 48, 16 an epoch: mid-epoch, in the first and in the second
        helpers.preempt_at_step(job_id, run_dir, at_step)
    assert helpers.wait_until_final(job_id, release_requeues=True) == "COMPLETED", log.read_text()[-3000:]

    history = stops(run_dir)
    assert [s["reason"] for s in history] == ["preempted", "preempted", "finished"], history
    assert all(after["resumed_from"] == before["checkpoint_step"] for before, after in zip(history, history[1:]))
    assert all(s["checkpoint_step"] == s["step"] for s in history)  # no step lost
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]
    expected, got = torch.load(reference_dir / "params.pt"), torch.load(run_dir / "params.pt")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    helpers.record(request.node.name, run_dir)
