"""A run whose training function blocks forever in a given step (started by test_watchdog.py).

python -m tests.integration.hang_worker RUN_DIR MAX_STEPS [HANG_AT_STEP [RELEASE_FILE]]

With RELEASE_FILE the step HANG_AT_STEP waits until that file exists instead of forever.

A finished run writes its result (step and final parameters) to RUN_DIR/result.json.
With WORLD_SIZE set (and RANK, MASTER_ADDR, MASTER_PORT), one rank of a gloo group: only the last rank hangs.

HANG_WORKER_GRACE_S: a stop signal's grace (signals.grace_s) and a step allowance far beyond it; the
step blocks in time.sleep. HANG_WORKER_HOLD_SOCKETS: before it blocks, the rank starts a child that holds
its sockets (as a forked DataLoader worker does), so that a SIGKILL of the rank leaves its peers waiting
in a collective instead of failing it. HANG_WORKER_TABLE: the failure table to load (failures.table).
"""

import os
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from hydra_preempt import SessionConfig, Status, run
from hydra_preempt.rundir import write_result


def wait_for(release):
    while not os.path.exists(release):
        threading.Event().wait(0.02)


def train(session, max_steps, hang_at, release=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    session.register(model=model, optimizer=opt)
    x = torch.ones(8, 4)
    for step in session.steps(max_steps):
        last_rank = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        if step == hang_at and session.resumed_from is None and last_rank:  # only the first start hangs
            if "HANG_WORKER_HOLD_SOCKETS" in os.environ:
                print(f"sockets held by pid {hold_sockets()}", flush=True)
            print(f"blocking in step {step}", flush=True)
            if release:
                wait_for(release)
            elif "HANG_WORKER_GRACE_S" in os.environ:
                while True:  # user code that does not return: the handler runs, the loop never ends
                    time.sleep(3600)
            else:
                threading.Event().wait()  # a step that never ends: a lost collective, a stuck read
        if "HANG_WORKER_ASYNC" in os.environ and step > 5 and step % 5:  # let the last background write land and settle
            checkpoints = session.run_dir / "checkpoints"
            while not any(checkpoints.glob(f"step-*{step - step % 5:09d}")):
                threading.Event().wait(0.01)
            threading.Event().wait(0.05)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        session.report(loss=loss)
        print(f"step {step + 1}", flush=True)
    return {"step": session.step, "weight": model.weight.tolist(), "bias": model.bias.tolist()}


def hold_sockets():
    """Start a child that inherits this process's sockets (the gloo pairs) and keeps them open; its pid."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.append(int(name))
        except OSError:  # the listing's own descriptor, gone by now
            pass
    return subprocess.Popen(["sleep", "600"], pass_fds=fds).pid


if __name__ == "__main__":
    run_dir, max_steps = sys.argv[1], int(sys.argv[2])
    hang_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    release = sys.argv[4] if len(sys.argv) > 4 else None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    config = SessionConfig.from_mapping(
        {
            # HANG_WORKER_ASYNC: background saves, one checkpoint kept (a write may end during the hang)
            "checkpoint": {"every_steps": 5, "async_save": "HANG_WORKER_ASYNC" in os.environ}
            | ({"keep_last": 1} if "HANG_WORKER_ASYNC" in os.environ else {}),
            "watchdog": {"timeout_s": 600.0 if "HANG_WORKER_GRACE_S" in os.environ else 2.0, "startup_s": 60.0},
        }
        | (
            {"signals": {"grace_s": float(os.environ["HANG_WORKER_GRACE_S"])}}
            if "HANG_WORKER_GRACE_S" in os.environ
            else {}
        )
        | ({"failures": {"table": os.environ["HANG_WORKER_TABLE"]}} if "HANG_WORKER_TABLE" in os.environ else {})
    )
    outcome = run(lambda session: train(session, max_steps, hang_at, release), run_dir, config)
    print(f"{outcome.status.value} at step {outcome.step}", flush=True)
    if outcome.status == Status.FINISHED:
        write_result(run_dir, outcome.result)
    if dist.is_initialized():
        dist.destroy_process_group()  # gloo's threads end before the process does
    sys.exit(int(outcome.exit_code))
