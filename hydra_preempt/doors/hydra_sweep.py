"""A sweep directory: its manifest, and where each of its jobs stands.

    SWEEP_DIR/sweep_manifest.json   one entry per job: number, overrides, run directory, cluster, job id

The manifest is written when jobs are submitted, so a sweep submitted with
`hydra.launcher.wait=false` can be followed later (`hydra-preempt status`)
and resumed by running the same command again: the launcher skips jobs whose
run finished, leaves alone jobs the scheduler still holds, and resubmits the
rest, which resume from their checkpoints. Where a job stands comes from its
run directory (run log, checkpoints, result.json), which outlives any job id,
and from the scheduler.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.layout import latest_checkpoint
from ..errors import ConfigError, HydraPreemptError
from ..fsutil import atomic_write_text
from ..gpumetrics import GPU_METRICS_FILE
from ..gpumetrics import summarize as summarize_gpus
from ..rundir import RUN_LOG, RunHistory, checkpoint_dir_of, read_result
from ..slurm.commands import SlurmError, sacct_states, show_job, state_outcome

MANIFEST = "sweep_manifest.json"
ACTIVE = ("waiting", "running", "held")  # state_outcome() values: the scheduler still has the job


class SweepMismatchError(HydraPreemptError):
    """The sweep directory holds a different sweep: refuse rather than mix results."""


@dataclass
class SweepJob:
    num: int
    overrides: list[str]
    dir: str  # the run directory (Hydra's job output directory)
    cluster: str  # "slurm" or "local"
    job_id: str | None = None
    subdir: str = ""  # dir relative to the sweep directory (hydra.sweep.subdir, resolved at launch)


def manifest_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / MANIFEST


def load_manifest(sweep_dir: Path) -> dict[int, SweepJob]:
    path = manifest_path(sweep_dir)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {int(j["num"]): SweepJob(**j) for j in data["jobs"]}
    except (ValueError, KeyError, TypeError) as e:
        raise HydraPreemptError(
            f"{path} is not a readable sweep manifest ({e}); move it aside to start this sweep afresh"
        ) from None


def save_manifest(sweep_dir: Path, jobs: dict[int, SweepJob]) -> Path:
    path = manifest_path(sweep_dir)
    body = {"jobs": [dataclasses.asdict(jobs[n]) for n in sorted(jobs)]}
    atomic_write_text(path, json.dumps(body, indent=1))
    return path


def check_same_sweep(sweep_dir: Path, recorded: dict[int, SweepJob], planned: list[SweepJob]) -> None:
    """Refuse when a job number of the manifest would now run with other overrides (or in another directory)."""
    for job in planned:
        old = recorded.get(job.num)
        if old is None:
            continue
        if sorted(old.overrides) != sorted(job.overrides) or old.dir != job.dir:
            raise SweepMismatchError(
                f"sweep directory {sweep_dir} belongs to a different sweep: job #{job.num} ran with "
                f"[{' '.join(old.overrides)}] in {old.dir}, this sweep would give it [{' '.join(job.overrides)}] in {job.dir}. "
                f"Use another hydra.sweep.dir for this sweep."
            )


@dataclass
class RunStanding:
    """A run directory's own account of the run."""

    status: str  # "not started", "running" (a start without a stop), or the last stop's reason
    starts: int
    preemptions: int
    timeouts: int
    checkpoint_step: int | None
    result: dict[str, Any] | None
    message: str = ""
    restart: str = ""  # the restart policy's decision on the last stop's failure ('nccl: restart (attempt 1/3)')

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def run_standing(run_dir: Path) -> RunStanding:
    history = RunHistory.read(run_dir)
    try:
        latest = latest_checkpoint(checkpoint_dir_of(run_dir)) if history.starts else None
    except ConfigError:  # status reports what it can; export names the ambiguity
        latest = None
    last_stop = history.last_stop
    return RunStanding(
        status=history.status,
        starts=len(history.starts),
        preemptions=history.stop_count("preempted"),
        timeouts=history.stop_count("timeout"),
        checkpoint_step=latest.step if latest else None,
        result=read_result(run_dir),
        message=last_stop.get("message", "") if last_stop else "",
        restart=str(last_stop.get("restart_reason") or "") if last_stop else "",
    )


def scheduler_state(job: SweepJob) -> str:
    """The scheduler's word on a job: a SLURM state ('RUNNING', 'COMPLETED', ...), for local jobs
    'RUNNING' or 'ENDED', or 'UNKNOWN'."""
    if not job.job_id:
        return "NOT SUBMITTED"
    if job.cluster == "local":
        return "RUNNING" if _local_job_alive(job.job_id) else "ENDED"
    try:
        return show_job(job.job_id).state or "UNKNOWN"
    except SlurmError:  # gone from the controller's memory (MinJobAge): ask the accounting
        try:
            states = sacct_states(job.job_id)
        except SlurmError:
            return "UNKNOWN"
        return states[-1][0] if states else "UNKNOWN"


def is_active(state: str) -> bool:
    return state == "RUNNING" or state_outcome(state) in ACTIVE


def _local_job_alive(pid: str) -> bool:
    """submitit's local job id is the pid of its controller process."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return b"submitit" in cmdline


def status_rows(path: Path) -> list[dict[str, Any]]:
    """What `hydra-preempt status` shows: one row per job of a sweep directory, or one row for a run
    directory (a Snakemake experiment, your own sbatch script: its job is the one of its latest start)."""
    jobs = load_manifest(path)
    one_run = not jobs and (path / RUN_LOG).is_file()
    if one_run:
        starts = RunHistory.read(path).starts
        job_id = str(starts[-1].get("job_id") or "") if starts else ""
        jobs = {0: SweepJob(0, [], str(path), "slurm", job_id or None)}
    elif not jobs:
        raise HydraPreemptError(
            f"{path} is neither a sweep (no {MANIFEST}: launched with hydra/launcher=preempt_slurm or "
            f"preempt_local) nor a run directory (no {RUN_LOG})"
        )
    rows = []
    for num in sorted(jobs):
        job = jobs[num]
        standing = run_standing(Path(job.dir))
        scheduler = "-" if one_run and not job.job_id else scheduler_state(job)  # "-": not a SLURM job
        ended = job.job_id and state_outcome(scheduler) in ("finished", "failed", "cancelled", "preempted")
        rows.append(
            {
                "num": path.name if one_run else num,
                "overrides": job.overrides,
                "job_id": job.job_id,
                "scheduler": scheduler,
                # a start without a stop in a job that ended: its process was killed without a word
                "run": "killed" if standing.status == "running" and ended else standing.status,
                "starts": standing.starts,
                "preemptions": standing.preemptions,
                "timeouts": standing.timeouts,
                "checkpoint_step": standing.checkpoint_step,
                "restart": standing.restart,
                "result": standing.result,
                "gpu": summarize_gpus(Path(job.dir) / GPU_METRICS_FILE),  # per GPU: peak memory, mean utilization
                "dir": job.dir,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of status_rows(); numeric final metrics shown as name=value."""
    header = [
        "#",
        "job id",
        "scheduler",
        "run",
        "preempted",
        "timeouts",
        "ckpt step",
        "restart",
        "gpu peak/util",
        "final metrics",
        "overrides",
    ]
    lines = [header]
    for r in rows:
        metrics = " ".join(
            f"{k}={v:.6g}"
            for k, v in sorted((r["result"] or {}).items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        lines.append(
            [
                str(r["num"]),
                r["job_id"] or "-",
                r["scheduler"],
                r["run"],
                str(r["preemptions"]),
                str(r["timeouts"]),
                "-" if r["checkpoint_step"] is None else str(r["checkpoint_step"]),
                r["restart"] or "-",
                " ".join(
                    f"{i}:{g['peak_memory_mib']:.0f}MiB/{g['mean_utilization_pct']:.0f}%"
                    for i, g in (r.get("gpu") or {}).items()
                )
                or "-",
                metrics or "-",
                " ".join(r["overrides"]),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
