"""`hydra-preempt validate --slurm`: the scheduler's side of the protocol, asked and tried for real.

Rows: the QoS exists and the user's association may use it, its GraceTime, the PreemptMode, KillWait,
JobRequeue; then one tiny batch job proves that a TERM sent to the job reaches its step (as a
preemption's does: SLURM signals the steps, not the batch shell; whether the batch shell heard it
too is a row of its own), that the job can requeue itself
with `scontrol requeue`, and that the requeued run sees SLURM_RESTART_COUNT=1.
"""

from __future__ import annotations

import contextlib
import getpass
import re
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import HydraPreemptError
from ..fsutil import create_file
from ..slurm.commands import SlurmError, parse_cluster_facts, show_job, slurm_command, state_outcome
from .checks import FAIL, PASS, SKIP, Row, pick_grace

JOB_SCRIPT = """#!/bin/bash
# hydra-preempt validate --slurm: signal to a step (and to the batch script), self-requeue, restart count.
# Exits within a minute.
echo "start restart=${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi
trap 'echo batch-got-TERM' TERM
srun -n 1 bash -c 'trap "echo step-got-TERM; exit 0" TERM; echo step-ready; for i in $(seq 450); do sleep 0.1; done; echo step-no-signal' &
wait
wait  # a TERM to this shell ends the first wait early
trap '' TERM  # the requeue signals this shell too: live to record its result (KILL comes after KillWait)
if scontrol requeue "$SLURM_JOB_ID"; then echo requeue-ok; else echo requeue-failed; fi
sleep 30  # the requeue ends this run: nothing after it is meant to run
"""


def require_slurm() -> None:
    """Raise HydraPreemptError (one line, exit 2) unless a SLURM controller answers."""
    try:
        slurm_command(["scontrol", "ping"], timeout=20)
    except SlurmError as e:
        raise HydraPreemptError(f"--slurm: SLURM does not answer here ({e})") from None


def settings_rows(config_text: str, qos_text: str, assoc_text: str, qos: str | None, account: str | None) -> list[Row]:
    """The QoS, its GraceTime, PreemptMode, KillWait and JobRequeue from the scheduler's answers.

    `qos_text`: `sacctmgr -n -P show qos format=Name,GraceTime,PreemptMode`;
    `assoc_text`: `sacctmgr -n -P show assoc where user=... format=Account,QOS`.
    """
    graces = "\n".join("|".join(line.split("|")[:2]) for line in qos_text.splitlines())
    found = pick_grace(graces, qos)
    if found is None:
        why = f"no QoS {qos!r} in the accounting database" if qos else "no QoS has a GraceTime"
        return [Row("slurm: QoS", FAIL, why)]
    name, grace_s = found
    modes = {line.split("|")[0]: "|".join(line.split("|")[1:]) for line in qos_text.splitlines() if line.strip()}
    facts = parse_cluster_facts(config_text, modes.get(name, ""))
    allowed = []
    for line in assoc_text.splitlines():
        acct, _, qoses = line.strip().partition("|")
        if acct and (account is None or acct == account) and name in qoses.split(","):
            allowed.append(acct)
    where = f"account {account}" if account else "any of your accounts"
    rows = [
        Row("slurm: QoS", PASS, f"QoS {name} may be used from account {allowed[0]}", {"qos": name, "accounts": allowed})
        if allowed
        else Row(
            "slurm: QoS", FAIL, f"QoS {name} exists but {where} may not use it (sacctmgr show assoc)", {"qos": name}
        )
    ]
    if grace_s > 0:
        rows.append(
            Row(
                "slurm: GraceTime",
                PASS,
                f"{grace_s:.0f} s between the preemption signal and the kill",
                {"grace_s": grace_s},
            )
        )
    else:
        rows.append(
            Row("slurm: GraceTime", FAIL, f"QoS {name} has GraceTime 0: a preempted job is killed without time to save")
        )
    mode = facts.preempt_mode
    if "REQUEUE" in mode:
        rows.append(Row("slurm: PreemptMode", PASS, f"{mode}: SLURM requeues a preempted job itself", {"mode": mode}))
    elif "CANCEL" in mode:
        rows.append(Row("slurm: PreemptMode", PASS, f"{mode}: the job requeues itself (run() does it)", {"mode": mode}))
    else:
        rows.append(
            Row("slurm: PreemptMode", FAIL, f"{mode}: a preempted job gets no grace period to save in", {"mode": mode})
        )
    rows.append(
        Row(
            "slurm: KillWait",
            PASS,
            f"{facts.kill_wait_s:.0f} s between the final TERM and KILL",
            {"kill_wait_s": facts.kill_wait_s},
        )
    )
    requeue = re.search(r"^JobRequeue\s*=\s*(\d+)", config_text, re.MULTILINE)
    if requeue is None:
        rows.append(Row("slurm: JobRequeue", SKIP, "scontrol show config does not say"))
    else:
        default = "requeued by default" if requeue[1] == "1" else "not requeued unless submitted with --requeue"
        rows.append(
            Row(
                "slurm: JobRequeue",
                PASS,
                f"JobRequeue={requeue[1]}: batch jobs are {default}",
                {"job_requeue": int(requeue[1])},
            )
        )
    return rows


def ask_settings(qos: str | None, account: str | None) -> tuple[list[Row], str | None]:
    """The settings rows, and the QoS the job should use."""
    config = slurm_command(["scontrol", "show", "config"])
    qos_text = slurm_command(["sacctmgr", "-n", "-P", "show", "qos", "format=Name,GraceTime,PreemptMode"])
    assoc = slurm_command(
        ["sacctmgr", "-n", "-P", "show", "assoc", "where", f"user={getpass.getuser()}", "format=Account,QOS"]
    )
    rows = settings_rows(config, qos_text, assoc, qos, account)
    return rows, rows[0].figures.get("qos") if rows[0].status == PASS else None


def job_rows(
    workdir: Path, qos: str, account: str | None, partition: str | None, timeout_s: float = 240.0
) -> list[Row]:
    """Submit the tiny job, TERM its step, let it requeue itself, release and read what both runs said."""
    script, log = workdir / "validate-job.sh", workdir / "validate-job.log"
    with create_file(script) as f:
        f.write(JOB_SCRIPT.encode())
    args = ["sbatch", "--parsable", "--requeue", "--open-mode=append", "-J", "hydra-preempt-validate"]
    args += ["-o", str(log), "-n", "1", "-c", "1", "-t", "5", f"--qos={qos}"]
    args += [f"--account={account}"] if account else []
    args += [f"--partition={partition}"] if partition else []
    job_id = slurm_command([*args, str(script)]).strip().split(";")[0]
    deadline = time.monotonic() + timeout_s
    said: list[str] = []

    def wait_until(test, what: str) -> None:
        while not test():
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id}: timed out waiting for {what}; its log: {' | '.join(said) or 'empty'}")
            time.sleep(0.5)

    def log_has(line: str) -> bool:
        said[:] = log.read_text(errors="replace").split() if log.exists() else []
        return line in said

    try:
        wait_until(lambda: log_has("step-ready"), "its step to start")
        slurm_command(["scancel", "--signal=TERM", job_id])  # to the steps, as a preemption's TERM
        wait_until(lambda: log_has("requeue-ok") or log_has("requeue-failed"), "its self-requeue")
        released = False

        def second_run() -> bool:
            nonlocal released
            if not released and show_job(job_id).state == "PENDING":
                # A requeued job waits ~120 s (BeginTime) before it may start again: not worth waiting for
                slurm_command(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
                released = True
            return log_has("restart=1")

        if log_has("requeue-ok"):
            wait_until(second_run, "its requeued run")
            wait_until(lambda: state_outcome(show_job(job_id).state) == "finished", "its requeued run to finish")
    finally:
        with contextlib.suppress(SlurmError):  # already gone
            slurm_command(["scancel", job_id])
    figures = {"job_id": job_id, "log": said}
    rows = [
        Row("slurm: signal to step", PASS, f"job {job_id}: TERM reached its srun step", figures)
        if "step-got-TERM" in said
        else Row("slurm: signal to step", FAIL, f"job {job_id}: its srun step never saw TERM", figures),
        Row(
            "slurm: batch script",
            PASS,
            f"job {job_id}: the batch script heard the TERM too; still, start training with `srun python ...`",
            figures,
        )
        if "batch-got-TERM" in said
        else Row(
            "slurm: batch script",
            PASS,
            f"job {job_id}: the TERM reached the srun step and not the batch script: start training with "
            "`srun python ...` in a batch script (a process the script starts directly hears a preemption only "
            "at the final kill)",
            figures,
        ),
        Row("slurm: self-requeue", PASS, f"job {job_id}: scontrol requeue from inside the job worked", figures)
        if "requeue-ok" in said or "restart=1" in said
        else Row("slurm: self-requeue", FAIL, f"job {job_id}: scontrol requeue from inside the job failed", figures),
        Row("slurm: restart count", PASS, f"job {job_id}: the requeued run saw SLURM_RESTART_COUNT=1", figures)
        if "restart=1" in said
        else Row("slurm: restart count", FAIL, f"job {job_id}: no requeued run with SLURM_RESTART_COUNT=1", figures),
    ]
    return rows


def slurm_rows(parent: Path, qos: str | None, account: str | None, partition: str | None) -> list[Row]:
    """The settings rows and the test job's, whose script and log go to a work directory of this user's
    alone inside `parent` (mkdtemp: nobody sharing `parent` can plant a link there), removed after."""
    try:
        rows, job_qos = ask_settings(qos, account)
    except SlurmError as e:
        return [Row("slurm: settings", FAIL, str(e))]
    if job_qos is None:
        return [*rows, Row("slurm: job", SKIP, "no usable QoS to submit the test job with")]
    try:
        workdir = Path(tempfile.mkdtemp(prefix="validate-slurm-", dir=parent))
    except OSError as e:
        return [*rows, Row("slurm: job", FAIL, f"cannot create a work directory in {parent}: {e.strerror or e}")]
    try:
        return [*rows, *job_rows(workdir, job_qos, account, partition)]
    except SlurmError as e:
        return [*rows, Row("slurm: job", FAIL, str(e))]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
