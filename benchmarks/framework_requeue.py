"""Lightning's own SLURM requeue against hydra_preempt.lightning.fit, under the same scheduler preemption.

    tests/cluster/slurm-cluster.sh up            (the project's test cluster; root, Debian)
    .venv/bin/python benchmarks/lightning_requeue.py [--stop-at 24] [--modes REQUEUE CANCEL]

The program is tests/e2e/lightning_ddp.py with 1 rank (96 optimizer steps, 2 DataLoader workers with random
augmentation, dropout, AdamW with a per-step schedule, accumulation 2, a validation every 10 batches), run as
an sbatch job whose `srun` starts it in the preemptible QoS of each PreemptMode; once it has made `--stop-at`
steps a normal-QoS job preempts it (the requeued job is released at once). Two ways:

- Lightning: plain `trainer.fit` with `SLURMEnvironment(auto_requeue=True)`, as its docs say;
- fit(): the same program under `hydra_preempt.lightning.fit`.

For each it prints the job's states (sacct), the steps computed in all starts, the step the run ended at,
the steps lost (computed again after a restart, plus those never made) and whether the final parameters
equal those of an uninterrupted plain `trainer.fit` on this host.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra_preempt.slurm.commands import sacct_states, slurm_command  # noqa: E402
from tests.e2e import helpers  # noqa: E402

STEPS = 96


def program(run_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tests.e2e.lightning_ddp", str(run_dir), "1", *flags]


def last_logged(run_dir: Path) -> int:
    """The last step the program logged (steps.log, either way), 0 before any."""
    log = run_dir / "steps.log"
    steps = log.read_text().split() if log.exists() else []
    return int(steps[-1]) if steps else 0


def preempted_once(work: Path, mode: str, flags: list[str], stop_at: int) -> dict:
    run_dir = work / "run"
    script = work / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=1 --ntasks-per-node=1 --cpus-per-task=2\n#SBATCH --requeue --open-mode=append\n"
        f"cd {ROOT}\nSTEP_SLEEP=0.05 srun {' '.join(program(run_dir, *flags))}\n"
    )
    args = ["sbatch", "--parsable", "-A", helpers.ACCOUNT, "-q", helpers.QOS[mode], "-p", helpers.PARTITION]
    job_id = slurm_command([*args, "-o", str(work / "job.log"), str(script)]).strip().split(";")[0]
    helpers.wait_for(lambda: last_logged(run_dir) >= stop_at, f"step {stop_at}", 300, job_id)
    helpers.preempt_with_high_priority_job(job_id)
    final = helpers.wait_until_final(job_id, timeout=600, release_requeues=True)
    steps = [int(s) for s in (run_dir / "steps.log").read_text().split()]
    reached = max(steps)
    params = run_dir / "params.pt"
    return {
        "states": [s for s, _ in sacct_states(job_id)] or [final],
        "computed": len(steps),
        "reached": reached,
        "lost": len(steps) - len(set(steps)) + (STEPS - reached),
        "params": torch.load(params) if params.exists() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stop-at", type=int, default=24)
    parser.add_argument("--modes", nargs="+", default=["REQUEUE", "CANCEL"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lightning-requeue-"))  # kept on a failure, for its job logs
    if True:
        subprocess.run([*program(work / "reference", "--plain")], cwd=ROOT, check=True, capture_output=True)
        reference = torch.load(work / "reference" / "params.pt")
        print(f"one preemption after step {args.stop_at} of {STEPS}, released at once when requeued")
        print(
            f"{'mode':8s} {'way':12s} {'job states (sacct)':42s} {'computed':>8s} {'ended at':>8s} {'lost':>5s}  identical"
        )
        for mode in args.modes:
            for way, flags in (("Lightning", ["--auto-requeue"]), ("fit()", [])):
                where = work / mode / flags[0].strip("-") if flags else work / mode / "fit"
                where.mkdir(parents=True)
                r = preempted_once(where, mode, flags, args.stop_at)
                same = r["params"] is not None and all(torch.equal(reference[k], r["params"][k]) for k in reference)
                states = " ".join(r["states"])
                print(
                    f"{mode:8s} {way:12s} {states:42s} {r['computed']:8d} {r['reached']:8d} {r['lost']:5d}  {'yes' if same else 'no'}"
                )


if __name__ == "__main__":
    main()
