"""Lightning's and Hugging Face Trainer's own SIGTERM handling against this project's integrations of each,
under the same scheduler preemption.

    tests/cluster/slurm-cluster.sh up            (the project's test cluster; root, Debian)
    .venv/bin/python benchmarks/framework_requeue.py [--frameworks lightning transformers] [--modes REQUEUE CANCEL]

Each framework's program is run as 1 process, an sbatch job whose `srun` starts it in the preemptible QoS of
each PreemptMode; once it has made `--stop-at` optimizer steps (default: half an epoch) a normal-QoS job
preempts it (SIGTERM to every process of the step, its 2 DataLoader workers included; the requeued job is
released at once). The programs:

- lightning: tests/e2e/lightning_ddp.py (96 steps: random augmentation in 2 workers, dropout, AdamW with a
  per-step schedule, accumulation 2, a validation every 10 batches), plain `trainer.fit` with
  `SLURMEnvironment(auto_requeue=True)` as Lightning's docs say, against `hydra_preempt.lightning.fit`;
- transformers: docs/transformers.md's program (tests/e2e/trainer_program.py; 48 steps: a 2-layer GPT-2,
  random token replacement in 2 workers, accumulation 2, a cosine schedule, an evaluation every 10 steps),
  plain `trainer.train()` with `enable_jit_checkpoint=True` and `resume_from_checkpoint` set to its newest
  checkpoint when there is one, against `hydra_preempt.transformers.train`.

For each it prints the job's states (sacct), the steps computed in all starts, the step the run ended at,
the steps lost (computed again after a restart, plus those never made) and whether the final parameters
equal those of an uninterrupted plain run on this host.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e import helpers  # noqa: E402


@dataclass(frozen=True)
class Program:
    module: str
    extra: tuple[str, ...]  # after the run directory
    steps: int
    epoch: int  # optimizer steps an epoch
    ways: tuple[tuple[str, str | None], ...]  # (name, flag) ; None: this project's integration
    step_sleep: float  # seconds added to each step, so that the preemption lands in the epoch it is sent in

    def command(self, run_dir: Path, flag: str | None) -> list[str]:
        return [sys.executable, "-m", self.module, str(run_dir), *self.extra, *([flag] if flag else [])]


PROGRAMS = {
    "lightning": Program(
        "tests.e2e.lightning_ddp", ("1",), 96, 32, (("auto_requeue", "--auto-requeue"), ("fit()", None)), 0.05
    ),
    "transformers": Program("tests.e2e.trainer_program", (), 48, 16, (("jit_ckpt", "--jit"), ("train()", None)), 0.2),
}


def last_logged(run_dir: Path) -> int:
    """The last step the program logged (steps.log, every way), 0 before any."""
    log = run_dir / "steps.log"
    steps = log.read_text().split() if log.exists() else []
    return int(steps[-1]) if steps else 0


def preempted_once(work: Path, mode: str, program: Program, flag: str | None, stop_at: int) -> dict:
    run_dir = work / "run"
    run_dir.mkdir()
    command = f"STEP_SLEEP={program.step_sleep} srun {' '.join(program.command(run_dir, flag))}"
    job_id = helpers.submit_script(work, command, mode)
    helpers.wait_for(lambda: last_logged(run_dir) >= stop_at, f"step {stop_at}", 300, job_id)
    helpers.preempt_with_high_priority_job(job_id)
    helpers.wait_until_final(job_id, timeout=600, release_requeues=True)
    computed = [int(s) for s in (run_dir / "steps.log").read_text().split()]
    reached = max(computed)
    params = run_dir / "params.pt"
    return {
        "states": helpers.final_sacct_states(job_id),
        "computed": len(computed),
        "reached": reached,
        "lost": len(computed) - len(set(computed)) + (program.steps - reached),
        "params": torch.load(params) if params.exists() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frameworks", nargs="+", default=list(PROGRAMS), choices=list(PROGRAMS))
    parser.add_argument("--stop-at", type=int, help="the step after which the job is preempted (half an epoch)")
    parser.add_argument("--modes", nargs="+", default=["REQUEUE", "CANCEL"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="framework-requeue-"))  # kept on a failure, for its job logs
    print(
        f"{'program':12s} {'mode':8s} {'way':12s} {'job states (sacct)':42s} {'computed':>8s} {'ended at':>8s}", end=""
    )
    print(f" {'lost':>5s}  identical")
    for framework in args.frameworks:
        program = PROGRAMS[framework]
        stop_at = args.stop_at or program.epoch // 2
        reference_dir = work / framework / "reference"
        reference_dir.mkdir(parents=True)
        subprocess.run(program.command(reference_dir, "--plain"), cwd=ROOT, check=True, capture_output=True)
        reference = torch.load(reference_dir / "params.pt")
        for mode in args.modes:
            for way, flag in program.ways:
                where = work / framework / mode / way.strip("()")
                where.mkdir(parents=True)
                r = preempted_once(where, mode, program, flag, stop_at)
                same = r["params"] is not None and all(torch.equal(reference[k], r["params"][k]) for k in reference)
                print(
                    f"{framework:12s} {mode:8s} {way:12s} {' '.join(r['states']):42s} {r['computed']:8d}"
                    f" {r['reached']:8d} {r['lost']:5d}  {'yes' if same else 'no'}  (preempted after step {stop_at} of {program.steps})"
                )


if __name__ == "__main__":
    main()
