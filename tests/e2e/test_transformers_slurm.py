"""The Trainer program of docs/transformers.md as 2 processes (DDP over gloo, 2 DataLoader workers each) under
`srun hydra-preempt torchrun` on the test cluster, preempted by the scheduler twice mid-epoch: it requeues
itself (CANCEL mode), resumes and ends with the parameters and log of a plain, uninterrupted
`trainer.train()` of the same program under torchrun on this host. One process, stopped twice, and 2 under
torchrun stopped once by a process-group SIGTERM: tests/integration/test_transformers.py; 1 process
preempted by the scheduler, beside Trainer's own SIGTERM handling: benchmarks/framework_requeue.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from . import helpers

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preempt_mode", ["CANCEL"], indirect=True)
def test_a_two_process_trainer_job_preempted_twice_ends_as_plain_trainer(tmp_path, preempt_mode, request):
    program = ["--standalone", "--nproc-per-node", "2", "-m", "tests.e2e.trainer_program"]
    reference_dir = tmp_path / "plain"
    reference_dir.mkdir()
    reference = subprocess.Popen(  # meanwhile, on this host
        [sys.executable, "-m", "torch.distributed.run", *program, str(reference_dir), "--plain"],
        cwd=helpers.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    work = tmp_path / "job"
    work.mkdir()
    command = f"STEP_SLEEP=0.5 srun {sys.executable} -m hydra_preempt.cli torchrun {' '.join(program)} {work}"
    job_id = helpers.submit_script(tmp_path, command, preempt_mode)
    run_dir = work / "runs" / "hf"
    # of 24, 8 an epoch; the preemption lands 2-3 steps after it is asked for: mid-epoch
    history = helpers.preempted_at_each_and_finished(job_id, run_dir, (1, 9), tmp_path / "job.log")
    assert [s["step"] % 8 != 0 for s in history[:2]] == [True, True], history
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]
    expected, got = torch.load(reference_dir / "params.pt"), torch.load(work / "params.pt")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert (reference_dir / "steps.log").read_text().split() == [str(s) for s in range(1, 25)]
    helpers.record(request.node.name, run_dir)
