"""`hydra-preempt validate`: the protocol checked on this machine, as PASS/FAIL/SKIP rows.

checks.py  the local checks (saves, signals, resume, disk, GPU, NCCL) and the rows' formatting
slurm.py   --slurm: SLURM's settings and a tiny test job
worker.py  the child processes the checks kill, signal and time (python -m hydra_preempt.validate.worker)
"""

from .checks import FAIL, PASS, SKIP, Row, exit_code, format_rows, validate

__all__ = ["FAIL", "PASS", "SKIP", "Row", "exit_code", "format_rows", "validate"]
