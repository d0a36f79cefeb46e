"""Driving the test cluster: submit training, preempt it with a high-priority job, wait, release."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_dir

import train
from hydra_preempt import PreemptibleTask, preemptible_executor, run
from hydra_preempt.rundir import read_events
from hydra_preempt.slurm.commands import SlurmError, sacct_states, show_job, slurm_command, state_outcome

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "research"
MEASUREMENTS: list[dict] = []
# One QoS per PreemptMode (the QoS's own mode overrides the cluster's), so that tests of both modes
# run at once; see tests/cluster/slurm-cluster.sh.
QOS = {"REQUEUE": "preemptible", "CANCEL": "preemptible_cancel"}
# pytest-xdist's workers each own a partition of NODES_PER_WORKER nodes, so that their tests never
# preempt, cancel or wait for each other's jobs; without xdist the default partition holds them.
NODES_PER_WORKER = 2
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
PARTITION = f"p{int(os.environ['PYTEST_XDIST_WORKER'].removeprefix('gw')) + 1}" if WORKERS > 1 else "debug"


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def submit_training(
    tmp_path: Path,
    overrides: list[str],
    mode: str,
    timeout_min: int = 20,
    signal_lead_s: int = 60,
    tasks: int = 1,
    **task_kwargs,
):
    """train.py's training as a submitit job in this worker's partition, in the QoS of PreemptMode `mode`."""
    cfg = compose_cfg(overrides)
    executor = preemptible_executor(
        tmp_path / "submitit",
        account=ACCOUNT,
        qos=QOS[mode],
        partition=PARTITION,
        timeout_min=timeout_min,
        signal_lead_s=signal_lead_s,
        tasks_per_node=tasks,
        cpus_per_task=2 // tasks,  # the whole node: a 2-CPU high-priority job preempts it
    )
    run_dir = tmp_path / "run"
    task = PreemptibleTask(functools.partial(train.train, cfg=cfg), run_dir, train.session_config(cfg), **task_kwargs)
    return executor.submit(task), run_dir


def reference_result(tmp_path: Path, overrides: list[str]) -> dict:
    """The same training, uninterrupted, in this process; without `trainer.step_sleep`, which only
    slows a job down so that a signal lands mid-run (train.py sleeps after the step)."""
    cfg = compose_cfg([o for o in overrides if not o.startswith("trainer.step_sleep=")])
    outcome = run(functools.partial(train.train, cfg=cfg), tmp_path / "reference", train.session_config(cfg))
    assert outcome.exit_code == 0, outcome.message
    return outcome.result


def two_rank_reference(tmp_path: Path, overrides: list[str]) -> dict:
    """The same training as 2 ranks (DDP or FSDP2 over gloo), uninterrupted, on this host; without
    `trainer.step_sleep`, which only slows a job down so that a signal lands mid-run."""
    from tests.integration.test_multi_rank import finish, start_ranks

    fast = [o for o in overrides if not o.startswith("trainer.step_sleep=")]
    codes, out = finish(start_ranks(tmp_path / "reference", fast))
    assert codes == [0, 0], out
    return json.loads((tmp_path / "reference" / "result.json").read_text())


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 300.0, job_id: str | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    context = ""
    if job_id:
        try:
            context = (
                f"\njob {job_id}: {show_job(job_id).fields.get('JobState')} {show_job(job_id).fields.get('Reason')}"
            )
        except Exception as e:  # the job may be gone from scontrol
            context = f"\n({e})"
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{context}")


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def stops(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == "stop"]


def job_state(job_id: str) -> str:
    try:
        return show_job(job_id).state
    except Exception:
        states = sacct_states(job_id)
        return states[-1][0] if states else ""


def submit_script(where: Path, command: str, mode: str, nodes: int = 1) -> str:
    """sbatch of WHERE/job.sh running `command` from the repository root under srun, one task a node, in
    the preemptible QoS of PreemptMode `mode`, requeueable, its output appended to WHERE/job.log; its id."""
    script = where / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes={nodes} --ntasks-per-node=1 --cpus-per-task=2\n"
        "#SBATCH --requeue --open-mode=append\n"
        f"cd {ROOT}\n{command}\n"
    )
    args = ["sbatch", "--parsable", "-A", ACCOUNT, "-q", QOS[mode], "-p", PARTITION, "-o", str(where / "job.log")]
    return slurm_command([*args, str(script)]).strip().split(";")[0]


def first_node(job_id: str) -> str:
    nodes = show_job(job_id).fields.get("NodeList", "")
    return slurm_command(["scontrol", "show", "hostnames", nodes]).split()[0]


def preempt_with_high_priority_job(job_id: str, seconds: int = 2) -> str:
    """A QoS-normal job needing both CPUs of the job's (first) node: the scheduler preempts the job for it."""
    args = ["sbatch", "--parsable", "-q", "normal", "-A", ACCOUNT, "-p", PARTITION, "-w", first_node(job_id)]
    return slurm_command([*args, "-N", "1", "-c", "2", "-o", "/dev/null", "--wrap", f"sleep {seconds}"]).strip()


def queue() -> str:
    """This worker's jobs, as squeue lists them (empty when none)."""
    return slurm_command(["squeue", "-h", "-p", PARTITION]).strip()


def release_when_pending(job_id: str, timeout: float = 300.0) -> None:
    """A requeued job waits ~120 s (BeginTime): make it eligible at once (the preemption itself is real)."""
    wait_for(lambda: release_if_requeued(job_id), f"job {job_id} to be PENDING again", timeout, job_id)


def release_if_requeued(job_id: str) -> bool:
    """A PENDING job is made eligible at once, once no step of its last start lives on any node: SLURM's
    BeginTime waits for that cleanup (after a node failure it requeues before the lost node's step has
    ended), and a step started again beside it with the same id is killed by the old one's clean-up.
    True when released."""
    if job_state(job_id) != "PENDING" or _steps_alive(job_id):
        return False
    with contextlib.suppress(SlurmError):  # it started meanwhile
        slurm_command(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    return True


def _steps_alive(job_id: str) -> bool:
    """Whether a slurmstepd of the job runs: every node of the test cluster is a namespace of this machine."""
    found = subprocess.run(["pgrep", "-f", rf"^slurmstepd: \[{job_id}\."], stdout=subprocess.DEVNULL, check=False)
    return found.returncode == 0


def preempt_at_step(job_id: str, run_dir: Path, step: int) -> None:
    """Once training passed `step`, preempt it with a high-priority job; wait for the save; release the requeued job."""
    preempt_each_at_step([(job_id, run_dir)], step)


def preempted_at_each_and_finished(job_id: str, run_dir: Path, steps: tuple[int, ...], log: Path) -> list[dict]:
    """Preempt the job once it passed each of `steps`; check that it completed, each stop saved at its own
    step and each start resumed there (no step lost). The stops of the run log."""
    for step in steps:
        preempt_at_step(job_id, run_dir, step)
    assert wait_until_final(job_id, release_requeues=True) == "COMPLETED", log.read_text()[-3000:]
    history = stops(run_dir)
    assert [s["reason"] for s in history] == ["preempted"] * len(steps) + ["finished"], history
    assert all(after["resumed_from"] == before["checkpoint_step"] for before, after in zip(history, history[1:]))
    assert all(s["checkpoint_step"] == s["step"] for s in history)  # no step lost
    return history


def preempt_each_at_step(jobs: list[tuple[str, Path]], step: int) -> None:
    """preempt_at_step for jobs that run at once: each is preempted as soon as it passed `step`."""
    before = {job_id: len(stops(run_dir)) for job_id, run_dir in jobs}
    waiting = dict(jobs)

    def preempt_those_past_step() -> bool:
        for job_id, run_dir in list(waiting.items()):
            if last_step(run_dir) >= step:
                preempt_with_high_priority_job(job_id)
                del waiting[job_id]
        return not waiting

    wait_for(preempt_those_past_step, f"training to reach step {step}", job_id=jobs[0][0])
    for job_id, run_dir in jobs:
        what = f"the preemption after step {step} to be saved"
        saved = functools.partial(lambda d, j: len(stops(d)) > before[j], run_dir, job_id)
        wait_for(saved, what, job_id=job_id)
        release_when_pending(job_id)


def final_sacct_states(job_id: str, timeout: float = 60.0) -> list[str]:
    """sacct's states of every run of a job that has ended, once the accounting has its last run's end
    (slurmdbd lags the controller: a job squeue shows COMPLETED may still be RUNNING in sacct)."""

    def recorded():
        states = [state for state, _ in sacct_states(job_id)]
        return states if states and state_outcome(states[-1]) not in ("waiting", "running") else None

    return wait_for(recorded, f"the accounting of job {job_id} to record its end", timeout, job_id)


def wait_until_final(job_id: str, timeout: float = 600.0, release_requeues: bool = False) -> str:
    """The job's state once it has ended (a PREEMPTED job that is requeued has not); with
    `release_requeues`, each requeue of the job is made eligible at once (as release_when_pending)."""

    def done():
        state = job_state(job_id)
        if release_requeues:
            release_if_requeued(job_id)
        return state if state_outcome(state) in ("finished", "failed", "cancelled", "preempted") else None

    return wait_for(done, f"job {job_id} to end", timeout, job_id)


def cancel_all_jobs() -> None:
    """Cancel this worker's jobs and wait until its partition is empty."""
    try:
        slurm_command(["scancel", "-p", PARTITION])
    except Exception:
        return
    wait_for(lambda: not queue(), f"partition {PARTITION} to empty", 120)


def record(test: str, run_dir: Path) -> None:
    """Signal -> durable checkpoint, signal -> requeue, steps lost, for each requeued stop of a run."""
    events = read_events(run_dir)
    stop_events = [e for e in events if e["event"] == "stop"]
    requeued = {(e["job_id"], e["step"]): e["signal_to_requeue_s"] for e in events if e["event"] == "requeue"}
    for stop, after in zip(stop_events, stop_events[1:]):
        MEASUREMENTS.append(
            {
                "test": test,
                "reason": stop["reason"],
                "signal_to_saved_s": stop["signal_to_saved_s"],
                "signal_to_requeue_s": requeued.get((stop["job_id"], stop["step"])),
                "steps_lost": stop["step"] - (after["resumed_from"] or 0),
            }
        )


def measurement_lines() -> list[str]:
    lines = [f"{'test':58s} {'stop':10s} {'signal->saved':>14s} {'signal->requeue':>16s} {'steps lost':>10s}"]
    for m in MEASUREMENTS:
        saved = f"{m['signal_to_saved_s']:.3f} s" if m["signal_to_saved_s"] is not None else "-"
        requeue = f"{m['signal_to_requeue_s']:.3f} s" if m["signal_to_requeue_s"] is not None else "(SLURM)"
        lines.append(f"{m['test'][:58]:58s} {m['reason']:10s} {saved:>14s} {requeue:>16s} {m['steps_lost']:>10d}")
    latencies = [float(m["signal_to_saved_s"]) for m in MEASUREMENTS if m["signal_to_saved_s"] is not None]
    if latencies:
        lines.append(
            f"median signal->saved {statistics.median(latencies):.3f} s over {len(latencies)} stops; "
            f"steps lost: max {max(m['steps_lost'] for m in MEASUREMENTS)}"
        )
    return lines
