"""How long a periodic checkpoint stalls training: background (checkpoint.async_save) vs at the boundary.

    python benchmarks/background_save.py [--gb 1.0] [--steps 30] [--every 10] [--rounds 2] [--dir DIR] [--device cuda]

A training loop of an MLP whose parameters plus AdamW moments are about
`--gb` GB, a periodic checkpoint every `--every` steps, run through
hydra_preempt.run() in three modes (taking turns, `--rounds` times):
background saves whose parameters and optimizer state are copied while the
next step computes (the default), background saves copied at the boundary
(`copy_while_training: false`), and saves at the boundary
(`async_save: false`). Timed from inside the loop: each step's body
(forward, backward, optimizer step, report) and each step boundary (from
the end of one body to the start of the next: the session's work, a save
included). A checkpoint's stall is its boundary's time less the median
boundary without a save, plus the time the next optimizer step waited for
the copies the writer thread makes while that step computes; the first
background save allocates its host buffers, later ones reuse them, so both
are shown. Against the least a snapshot can cost: copying the same tensors
into preallocated host buffers that are reused, timed inside the same loops
(at the start of each step before a save, when no write is in flight; not
counted in the step bodies), so that it meets the same load as the saves on
a shared machine; and, after the runs, the same copy and a copy into fresh
buffers (clone). Also: how much slower the
step bodies are while a write runs beside them (this machine has 2 cores,
shared by training and the writer). The same loop without a session, saved
by `torch.distributed.checkpoint.async_save` with its default stager and
with async staging (the update waits for `staging_completion`), unless
`--no-dcp`. With `--device cuda` the state lives in
GPU memory: the floor is a device-to-host copy into reused pinned buffers,
and every timing waits for the GPU (tools/gpu_kit.py runs it so).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hydra_preempt import SessionConfig, run


def build(gb: float, device: str = "cpu") -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    layers = 8
    width = int((gb * 1e9 / (3 * 4 * layers)) ** 0.5)  # parameters + two AdamW moments, fp32
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5), torch.randn(4, width, device=device)


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so that a timing covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


MODES = {  # name: (checkpoint.async_save, checkpoint.copy_while_training)
    "background, copied while training": (True, True),
    "background, copied at the boundary": (True, False),
    "at the boundary (async_save=false)": (False, False),
}


def training(args: argparse.Namespace, run_dir: Path, mode: str) -> dict[str, list[float]]:
    model, optimizer, x = build(args.gb, args.device)
    times: dict[str, list[float]] = {
        "first_save": [],
        "save": [],
        "boundary": [],
        "body": [],
        "body_beside_write": [],
        "copy": [],
        "update_wait": [],
    }
    floor = ReusedCopy(args.device)

    def train(session) -> dict:
        wait_staged = session.state.before_update

        def timed_wait() -> None:  # the optimizer step waiting for copies left for the writer thread
            began = time.perf_counter()
            wait_staged()
            times["update_wait"].append(time.perf_counter() - began)

        session.state.before_update = timed_wait
        session.register(model=model, optimizer=optimizer)
        session.restore()
        body_end = None
        for step in session.steps(args.steps):
            started = time.perf_counter()
            if body_end is not None:
                kind = "boundary" if step % args.every else "first_save" if step == args.every else "save"
                times[kind].append(started - body_end)
            writing = bool(session.checkpointer.background_flags()[0])
            if step % args.every == args.every - 1 and not writing:
                times["copy"].append(floor.copy(model, optimizer))  # the floor, under the same load
                started = time.perf_counter()
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            session.report(loss=0.0)
            sync(args.device)
            body_end = time.perf_counter()
            if step > 0:  # step 0 allocates AdamW's moments
                times["body_beside_write" if writing else "body"].append(body_end - started)
        return {}

    config = SessionConfig.from_mapping(
        {
            "checkpoint": {
                "every_steps": args.every,
                "keep_last": 1,
                "async_save": MODES[mode][0],
                "copy_while_training": MODES[mode][1],
                "emergency": False,
            },
            "divergence": {"enabled": False},
            "progress": {"console": False},  # the figures alone on the terminal
        }
    )
    outcome = run(train, run_dir, config)
    assert outcome.exit_code == 0, outcome.message
    return times


DCP_MODES = {  # name: StagingOptions.use_async_staging
    "DCP async_save, default stager": False,
    "DCP async_save, async staging": True,
}


def dcp_training(args: argparse.Namespace, run_dir: Path, mode: str) -> dict[str, list[float]]:
    """The same loop without a session, saved by torch.distributed.checkpoint's async_save every
    `--every` steps (one save in flight, as the session's); with async staging the copy overlaps the
    next step and that step's update waits for it (`staging_completion`), as DCP asks."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    model, optimizer, x = build(args.gb, args.device)
    gpu = args.device == "cuda"
    stager = DefaultStager(
        StagingOptions(
            use_pinned_memory=gpu,
            use_shared_memory=False,
            use_async_staging=DCP_MODES[mode],
            use_non_blocking_copy=gpu,
        )
    )
    times: dict[str, list[float]] = {k: [] for k in ("first_save", "save", "boundary", "body", "update_wait", "copy")}
    staging: Any = None
    upload: Any = None
    try:
        for step in range(args.steps):
            started = time.perf_counter()
            model(x).square().mean().backward()
            if staging is not None:
                began = time.perf_counter()
                staging.result()
                times["update_wait"].append(time.perf_counter() - began)
                staging = None
            optimizer.step()
            optimizer.zero_grad()
            sync(args.device)
            if step > 0:
                times["body"].append(time.perf_counter() - started)
            began = time.perf_counter()
            if (step + 1) % args.every == 0:
                if upload is not None:
                    upload.result()  # one save in flight
                state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
                response = dcp.async_save(
                    state, checkpoint_id=str(run_dir / f"step-{step + 1}"), async_stager=stager, no_dist=True
                )
                if isinstance(response, dcp.state_dict_saver.AsyncSaveResponse):  # async staging
                    staging, upload = response.staging_completion, response.upload_completion
                else:
                    upload = response
                times["first_save" if step + 1 == args.every else "save"].append(time.perf_counter() - began)
            else:
                times["boundary"].append(time.perf_counter() - began)
        if upload is not None:
            upload.result()
    finally:
        stager.close()
    return times


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return list(model.state_dict().values()) + [v for s in optimizer.state.values() for v in s.values() if v.dim() > 0]


class ReusedCopy:
    """A copy of the state's tensors into host buffers allocated and touched once, then reused
    (pinned for GPU tensors, copied without blocking and waited for at the end, as the staging is)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.buffers: list[torch.Tensor] = []

    def copy(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        tensors = state_tensors(model, optimizer)
        gpu = self.device == "cuda"
        if not self.buffers:
            self.buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=gpu) for t in tensors]
            for b, t in zip(self.buffers, tensors):
                b.copy_(t)  # touched once, as the staging buffers are after the first save
        sync(self.device)
        started = time.perf_counter()
        for b, t in zip(self.buffers, tensors):
            b.copy_(t, non_blocking=gpu)
        sync(self.device)
        return time.perf_counter() - started


def copy_reference(gb: float, device: str, repeats: int = 3) -> tuple[float, float]:
    """Seconds to copy the state's tensors into reused host buffers, and into fresh ones (clone)."""
    model, optimizer, x = build(gb, device)
    model(x).square().mean().backward()
    optimizer.step()
    tensors = state_tensors(model, optimizer)
    floor = ReusedCopy(device)
    reused, fresh = [], []
    for _ in range(repeats):
        reused.append(floor.copy(model, optimizer))
        started = time.perf_counter()
        clones = [t.to("cpu", copy=True) for t in tensors]
        fresh.append(time.perf_counter() - started)
        del clones
    return statistics.median(reused), statistics.median(fresh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints go (default: under ./benchmarks)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the state lives")
    parser.add_argument("--no-dcp", action="store_true", help="leave out DCP's async_save")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="background-bench-", dir=args.dir or Path(__file__).parent))
    results: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
    try:
        for r in range(args.rounds):
            for i, mode in enumerate(list(MODES)[r % 3 :] + list(MODES)[: r % 3]):  # each goes first in turn
                times = training(args, base / f"run-{i}-{r}", mode)
                for kind, values in times.items():
                    results[mode].setdefault(kind, []).extend(values)
                shutil.rmtree(base / f"run-{i}-{r}")
            if not args.no_dcp:
                for mode in DCP_MODES:
                    (base / "dcp").mkdir()
                    for kind, values in dcp_training(args, base / "dcp", mode).items():
                        results.setdefault(mode, {}).setdefault(kind, []).extend(values)
                    shutil.rmtree(base / "dcp")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    reused, fresh = copy_reference(args.gb, args.device)
    copies = [c for t in results.values() for c in t["copy"]]
    in_loop = statistics.median(copies)
    print(
        f"state: {args.gb:.2f} GB (parameters + AdamW moments) on {args.device}, a checkpoint every {args.every} steps, "
        f"{args.steps} steps x {args.rounds} rounds per mode, in {args.dir or 'benchmarks/'}; medians"
    )
    print(
        f"  copy into reused host buffers: {in_loop * 1e3:7.0f} ms in the loops ({len(copies)} copies, "
        f"{min(copies) * 1e3:.0f}-{max(copies) * 1e3:.0f} ms); after them {reused * 1e3:.0f} ms "
        f"(fresh host tensors: {fresh * 1e3:.0f} ms)"
    )
    stalls = {}
    for name, t in results.items():
        if not t:
            continue
        boundary = statistics.median(t["boundary"])
        saves = len(t["save"]) + len(t["first_save"])
        waited = sum(t["update_wait"]) / max(saves, 1)  # an update waiting for the copy blocks training too
        stalls[name] = statistics.median(t["save"]) - boundary + waited
        first = statistics.median(t["first_save"]) - boundary
        line = (
            f"  {name:36s} stall per checkpoint {stalls[name] * 1e3:6.0f} ms "
            f"(the next update waiting for the copy: {waited * 1e3:.0f} ms of it; the first save at its boundary: "
            f"{first * 1e3:.0f} ms); step body {statistics.median(t['body']) * 1e3:.0f} ms"
        )
        if t.get("body_beside_write"):
            slower = statistics.median(t["body_beside_write"]) / statistics.median(t["body"])
            line += f", {slower:.2f}x beside a write ({len(t['body_beside_write'])} steps)"
        print(line)
    default = "background, copied while training"
    print(f"  stall, background / copy into reused buffers: {stalls[default] / in_loop:.2f} (goal <= 0.25)")
    print("  stall / copy into reused buffers in the loops (after them):")
    for name, stall in stalls.items():  # (DCP's boundary is timed around its own calls only)
        print(f"    {name:36s} {stall / in_loop:5.2f} ({stall / reused:.2f})")


if __name__ == "__main__":
    main()
