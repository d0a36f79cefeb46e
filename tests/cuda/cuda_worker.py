"""A small training run on the GPU, for the CUDA tests and tools/gpu_kit.py.

    python -m tests.cuda.cuda_worker RUN_DIR STEPS OUT.json [--no-determinism] [--fsdp] [--sleep S]

An MLP with dropout; its inputs are drawn on the GPU from the global CUDA
generator, so an exact resume needs the CUDA RNG state of the checkpoint, as
dropout does. Prints "step N" after each step (a parent signals it there),
exits with the session's code (75 when stopped by SIGTERM), and at the end
writes the SHA-256 of the full parameters and optimizer state to OUT.json.

Determinism, as the README says for CUDA: CUBLAS_WORKSPACE_CONFIG=:4096:8 set
before CUDA starts and torch.use_deterministic_algorithms(True). With
--no-determinism neither is set. With --fsdp the model is sharded with FSDP2
over a one-GPU NCCL process group, so checkpoints take the sharded path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("steps", type=int)
    parser.add_argument("out")
    parser.add_argument("--no-determinism", action="store_true")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.005)
    parser.add_argument("--device", default="cuda", help="cpu: the same run without a GPU (gloo for --fsdp)")
    args = parser.parse_args()
    if not args.no_determinism:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # read when cuBLAS starts: before any CUDA work

    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from hydra_preempt import SessionConfig, run

    torch.use_deterministic_algorithms(not args.no_determinism)
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.fsdp:
        os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)

    def train(session) -> dict:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(256, 8)
        ).to(device)
        if args.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=init_device_mesh(device.type, (1,)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        session.register(model=model, optimizer=optimizer)
        session.restore()
        for step in session.steps(args.steps):
            x = torch.randn(128, 64, device=device)  # the global CUDA generator
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.report(loss=loss.item())
            print(f"step {step + 1}", flush=True)
            time.sleep(args.sleep)
        model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        h = hashlib.sha256()
        flat = {f"model.{k}": v for k, v in model_state.items()}
        for fqn, state in optim_state["state"].items():
            flat.update({f"optim.{fqn}.{k}": v for k, v in state.items()})
        for name, t in sorted(flat.items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        result = {"step": session.step, "sha256": h.hexdigest(), "restarts": session.restarts}
        with open(args.out, "w") as f:
            json.dump(result, f)
        return result

    config = SessionConfig.from_mapping(
        {"checkpoint": {"every_steps": 40, "keep_last": 2}, "divergence": {"enabled": False}}
    )
    outcome = run(train, args.run_dir, config)
    print(f"{outcome.status.value} at step {outcome.step}: {outcome.message}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return int(outcome.exit_code)


if __name__ == "__main__":
    sys.exit(main())
