"""A Lightning program under hydra_preempt.lightning.fit on the test cluster, 2 ranks on two nodes (srun, DDP
over gloo) and 1, preempted twice by the scheduler (CANCEL mode: it requeues itself; REQUEUE mode adds
nothing Lightning-specific and takes twice as long, tests/e2e/test_slurm_preemption.py covers it): it resumes
mid-epoch and ends with the parameters of a plain, uninterrupted `trainer.fit` of the same program (on this
host; Lightning's own launch of its 2 processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hydra_preempt.slurm.commands import slurm_command

from . import helpers
from .helpers import stops

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ranks, preempt_mode", [(2, "CANCEL"), (1, "CANCEL")], indirect=["preempt_mode"])
def test_a_lightning_job_preempted_twice_ends_as_plain_lightning(tmp_path, ranks, preempt_mode, request):
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
        f"STEP_SLEEP=0.05 srun {sys.executable} -m tests.e2e.lightning_ddp {run_dir} {ranks}\n"
    )
    args = ["sbatch", "--parsable", "-A", helpers.ACCOUNT, "-q", helpers.QOS[preempt_mode], "-p", helpers.PARTITION]
    log = tmp_path / "job.log"
    job_id = slurm_command([*args, "-o", str(log), str(script)]).strip().split(";")[0]
    steps = 48 * 2 // ranks  # 3 epochs of 2048 samples in batches of 32 a rank, 2 batches a step
    for step in (steps // 4, steps * 5 // 8):  # in the first or second epoch, then in the second
        helpers.preempt_at_step(job_id, run_dir, step)
    assert helpers.wait_until_final(job_id, release_requeues=True) == "COMPLETED", log.read_text()[-3000:]

    history = stops(run_dir)
    assert [s["reason"] for s in history] == ["preempted", "preempted", "finished"], history
    assert [s["resumed_from"] for s in history[1:]] == [s["checkpoint_step"] for s in history[:2]]
    assert all(s["checkpoint_step"] == s["step"] for s in history)  # no step lost
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]
    expected, got = torch.load(reference_dir / "params.pt"), torch.load(run_dir / "params.pt")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    helpers.record(request.node.name, run_dir)
