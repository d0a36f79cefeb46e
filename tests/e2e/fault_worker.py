"""A short training run that fails in a chosen way at a chosen step (started by test_failures_slurm.py).

python -m tests.e2e.fault_worker RUN_DIR FAULT AT_STEP [--every-start] [--failures TABLE]

FAULT is one of:
  kill       the process sends itself SIGKILL (no stop is written: it dies without a word)
  nccl-log   an NCCL watchdog's last words on stderr, then abort(), as NCCL's watchdog does
  nccl       torch.distributed.DistBackendError with an NCCL message, raised in the step
  cuda-oom   torch.OutOfMemoryError, raised in the step
  slow       every step from AT_STEP on takes a second (time to scancel it)
  none       no fault: the uninterrupted reference
The fault happens on the first start only (a resumed run trains on), or with --every-start on each.
A finished run writes its result (a digest of the final parameters and optimizer state) to RUN_DIR/result.json.
"""

import argparse
import hashlib
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from hydra_preempt import SessionConfig, Status, exit_with, run
from hydra_preempt.rundir import write_result

STEPS = 20
NCCL_ERROR = (
    "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, unhandled system error "
    "(run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5"
)
NCCL_WATCHDOG = (
    "[rank0]:[E1128 04:41:07.123456 2512 ProcessGroupNCCL.cpp:616] [Rank 0] Watchdog caught collective "
    "operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE, NumelIn=5, NumelOut=5, Timeout(ms)=600000) "
    "ran for 600006 milliseconds before timing out."
)


def digest(*objects) -> str:
    h = hashlib.sha256()
    for obj in objects:
        for key, value in sorted(obj.state_dict().items(), key=lambda kv: str(kv[0])):
            h.update(repr((key, value)).encode())
    return h.hexdigest()


def fail(fault: str, step: int) -> None:
    print(f"fault {fault} in step {step}", flush=True)
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "nccl-log":
        print(NCCL_WATCHDOG, file=sys.stderr, flush=True)
        os.abort()
    elif fault == "nccl":
        raise dist.DistBackendError(NCCL_ERROR)
    elif fault == "cuda-oom":
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total capacity)"
        )
    elif fault == "slow":
        time.sleep(1.0)


def train(session, fault: str, at_step: int, every_start: bool):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    session.register(model=model, optimizer=opt)
    for step in session.steps(STEPS):
        first_start = session.resumed_from is None  # known once steps() has restored the state
        if (fault == "slow" and step >= at_step) or (
            step == at_step and fault != "none" and (every_start or first_start)
        ):
            fail(fault, step)
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.report(loss=loss)
    return {"step": session.step, "digest": digest(model, opt)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("fault", choices=["kill", "nccl-log", "nccl", "cuda-oom", "slow", "none"])
    parser.add_argument("at_step", type=int)
    parser.add_argument("--every-start", action="store_true")
    parser.add_argument("--failures", default=None, help="the failure table (default: the shipped one)")
    args = parser.parse_args()
    sections = {"checkpoint": {"every_steps": 5, "async_save": False}, "failures": {"table": args.failures}}
    outcome = run(
        lambda session: train(session, args.fault, args.at_step, args.every_start),
        args.run_dir,
        SessionConfig.from_mapping(sections),
    )
    print(f"{outcome.status.value} at step {outcome.step}: {outcome.message}", flush=True)
    if outcome.status == Status.FINISHED:
        write_result(args.run_dir, outcome.result)
    exit_with(outcome)  # requeues the job when the restart policy said so


if __name__ == "__main__":
    main()
