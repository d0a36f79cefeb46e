"""Stop signals after a run finished: a process that exits next keeps exit code 0; a program that goes on
gets its own handlers back."""

import signal
import subprocess
import sys

from hydra_preempt import JobContext, run
from hydra_preempt.doors.submitit import job_ends_process

# run() to the end, then a SIGTERM to itself: the late signal of a scheduler, at the worst moment
SCRIPT = """
import os, signal, sys
from hydra_preempt import JobContext, run
outcome = run(lambda session: {}, sys.argv[1], job=JobContext(slurm_task=None, ends_process=True))
os.kill(os.getpid(), signal.SIGTERM)
sys.exit(int(outcome.exit_code))
"""


def test_a_sigterm_after_the_run_finished_keeps_exit_code_0(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_run_inside_a_program_restores_its_handlers(tmp_path):
    def own(signum, frame):
        pass

    previous = {s: signal.signal(s, own) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        assert run(lambda session: {}, tmp_path / "a", job=JobContext(slurm_task=None)).exit_code == 0
        assert {signal.getsignal(s) for s in previous} == {own}
        # a failed run too (nothing held)
        assert run(lambda session: 1 / 0, tmp_path / "b", job=JobContext(slurm_task=None)).exit_code == 1
        assert {signal.getsignal(s) for s in previous} == {own}
        # a process that ends next: ignored until the exit
        run(lambda session: {}, tmp_path / "c", job=JobContext(slurm_task=None, ends_process=True))
        assert {signal.getsignal(s) for s in previous} == {signal.SIG_IGN}
        assert signal.set_wakeup_fd(-1) == -1  # the signal pipe is given back: a later run here gets one
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_task_outside_a_submitit_job_does_not_end_the_process():
    assert job_ends_process() is False
