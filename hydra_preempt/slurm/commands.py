"""Everything that talks to SLURM: scontrol, sacctmgr, sacct, sbatch.

Commands are argument lists (never a shell line) with timeouts; the
scheduler's own error text is surfaced in SlurmError. Parsing tolerates
fields that differ between SLURM versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import re
import signal
import subprocess
from dataclasses import dataclass
from typing import Iterator, Mapping

from ..errors import HydraPreemptError

log = logging.getLogger("hydra_preempt")


class SlurmError(HydraPreemptError):
    """A SLURM command failed; the message holds the scheduler's own words."""


# Scheduler states -> what they mean for a run (explicit, as in snakemake-executor-plugin-slurm):
# every state of `man sacct` and `man squeue` (JOB STATE CODES). A state not in it is "unknown":
# the job is taken as still there and not judged.
JOB_STATE_OUTCOME: dict[str, str] = {
    "PENDING": "waiting",
    "CONFIGURING": "running",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "running",  # its processes stopped (scontrol suspend, gang scheduling): it goes on later
    "STOPPED": "running",  # stopped with SIGSTOP, allocation kept
    "SIGNALING": "running",  # being signaled: whatever it leads to is a state of its own
    "STAGE_OUT": "running",  # staging files out after its processes ended: the end state comes next
    "RESIZING": "running",
    "REQUEUED": "waiting",  # requeued: will run again
    "REQUEUE_FED": "waiting",
    "REQUEUE_HOLD": "held",
    "RESV_DEL_HOLD": "held",  # its reservation was deleted: held until released
    "SPECIAL_EXIT": "held",  # requeued in a special state (EpilogSlurmctld), held until released
    "REVOKED": "elsewhere",  # a federation sibling removed because the job runs on another cluster
    "PREEMPTED": "preempted",  # final unless requeued (PreemptMode=CANCEL without self-requeue)
    "COMPLETED": "finished",
    "CANCELLED": "cancelled",
    "FAILED": "failed",
    "TIMEOUT": "failed",
    "OUT_OF_MEMORY": "failed",
    "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
}


def state_outcome(state: str) -> str:
    """'CANCELLED by 0' -> 'cancelled'; unknown states -> 'unknown'."""
    return JOB_STATE_OUTCOME.get(state.split()[0].rstrip("+") if state else "", "unknown")


def slurm_command(args: list[str], timeout: float = 30.0) -> str:
    """The command's stdout, decoded with replacement: a job name or path in another encoding (a
    Latin-1 byte) is a replacement character, never an error."""
    try:
        done = subprocess.run(args, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} not found: SLURM's commands are not installed here") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(args)} did not answer within {timeout:.0f} s") from None
    stdout = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")
        text = (stderr.strip() or stdout.strip() or f"exit code {done.returncode}").replace("\n", "; ")
        raise SlurmError(f"{args[0]}: {text}")
    return stdout


_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_key_values(line: str) -> dict[str, str]:
    """Parse `scontrol show ... -o` output: Key=Value pairs, values may hold spaces."""
    matches = list(_KEY.finditer(line))
    fields = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        fields[m[1]] = line[m.end() : nxt.start() if nxt else len(line)].strip()
    return fields


def parse_time(value: str | None) -> dt.datetime | None:
    """SLURM's local timestamps; None/Unknown/N/A -> None."""
    if not value or value in ("None", "Unknown", "N/A", "(null)"):
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.astimezone().replace(tzinfo=None) if when.tzinfo else when  # local, as SLURM's own


_DURATION = re.compile(r"(\d+-)?\d+(:\d+){0,2}")


def parse_duration(value: str | None) -> float | None:
    """'[days-]hours:minutes:seconds', 'minutes:seconds' or 'minutes' -> seconds; UNLIMITED (or
    anything else that is no duration) -> None."""
    if not value or not _DURATION.fullmatch(value.strip()):
        return None
    days, _, rest = value.strip().rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        seconds = parts[0] * 60
    elif len(parts) == 2:
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return float(seconds + (int(days) * 86400 if days else 0))


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    state: str
    preempt_time: dt.datetime | None
    start_time: dt.datetime | None
    end_time: dt.datetime | None  # when it will be killed: the time limit, or "now" after scancel
    time_limit_s: float | None
    restarts: int
    requeue: bool
    qos: str
    fields: Mapping[str, str]

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> JobInfo:
        restarts = fields.get("Restarts", "0")
        return cls(
            job_id=fields.get("JobId", ""),
            state=fields.get("JobState", ""),
            preempt_time=parse_time(fields.get("PreemptTime")),
            start_time=parse_time(fields.get("StartTime")),
            end_time=parse_time(fields.get("EndTime")),
            time_limit_s=parse_duration(fields.get("TimeLimit")),
            restarts=int(restarts) if restarts.isdecimal() else 0,
            requeue=fields.get("Requeue", "0") == "1",
            qos=fields.get("QOS", ""),
            fields=dict(fields),
        )

    @property
    def limit_end(self) -> dt.datetime | None:
        """When this run reaches its time limit (unlike EndTime, not moved by scancel)."""
        if self.start_time is None or self.time_limit_s is None:
            return None
        return self.start_time + dt.timedelta(seconds=self.time_limit_s)


def show_job(job_id: str) -> JobInfo:
    return JobInfo.from_fields(parse_key_values(slurm_command(["scontrol", "show", "job", "-o", str(job_id)]).strip()))


def requeue_job(job_id: str) -> None:
    """`scontrol requeue`, which lives to report the requeue when a job requeues itself: the requeue makes
    slurmd signal every process of the job at once (SIGTERM), this scontrol too, which then read as a
    failed requeue (exit -15) while SLURM had requeued the job. scontrol starts with the stop signals
    blocked (a child inherits the mask of the thread that starts it). A job that records its requeue
    does so inside `stop_signals_held()`, or that SIGTERM may end it first."""
    with stop_signals_held():
        slurm_command(["scontrol", "requeue", str(job_id)], timeout=60)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT wait, blocked in this thread, until the block ends (then they are taken as
    usual). Nested blocks keep them blocked until the outermost ends."""
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass(frozen=True)
class ClusterFacts:
    """What does not change while a job runs: KillWait, and its QoS's GraceTime and PreemptMode."""

    kill_wait_s: float = 0.0
    grace_s: float | None = 0.0  # None: the QoS's GraceTime could not be read
    preempt_mode: str = "OFF"  # the QoS's own, else the cluster's


def cluster_facts(qos: str) -> ClusterFacts:
    """Read once per run: `scontrol show config` and the QoS's settings, one call each. An accounting
    database that does not answer leaves the QoS's GraceTime unknown (None) and the cluster's
    PreemptMode and KillWait standing: never a grace of 0, which would put the kill at the signal."""
    config = slurm_command(["scontrol", "show", "config"])
    try:
        fields = (
            slurm_command(["sacctmgr", "-n", "-P", "show", "qos", qos, "format=GraceTime,PreemptMode"]) if qos else ""
        )
    except SlurmError as e:
        log.warning("cannot read the GraceTime of QoS %s (%s): the kill deadline of a preemption is unknown", qos, e)
        return dataclasses.replace(parse_cluster_facts(config, ""), grace_s=None)
    return parse_cluster_facts(config, fields)


def parse_cluster_facts(config_text: str, qos_fields: str) -> ClusterFacts:
    """`scontrol show config` text and the QoS's 'GraceTime|PreemptMode' line -> ClusterFacts."""
    config = dict(re.findall(r"^(\w+)[ \t]*=[ \t]*(.*?)[ \t]*$", config_text, re.MULTILINE))
    kill_wait = re.match(r"\d+", config.get("KillWait", ""))
    grace, _, mode = qos_fields.strip().partition("|")
    if not mode or mode.lower() in ("cluster", "off"):
        mode = config.get("PreemptMode", "OFF")
    return ClusterFacts(float(kill_wait[0]) if kill_wait else 30.0, parse_duration(grace) or 0.0, mode.upper())


def parse_sacct(text: str, columns: int) -> list[list[str]]:
    """`sacct -n -P` lines of at least `columns` fields with a state in the first -> their fields.

    An answer with a line that is not such (no `|`, an empty state: `|||`) is no answer at all:
    SlurmError naming the line, as skipping it would miscount a job's runs."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < columns or not fields[0].strip():
            raise SlurmError(f"sacct's answer cannot be read: {line.strip()[:80]!r}")
        rows.append([f.strip() for f in fields])
    return rows


def sacct_states(job_id: str) -> list[tuple[str, str]]:
    """(state, exit code) of every run of a job, requeues included, oldest first."""
    out = slurm_command(["sacct", "-j", str(job_id), "-D", "-X", "-n", "-P", "-o", "State,ExitCode"])
    return [(row[0], row[1]) for row in parse_sacct(out, 2)]


def sacct_runs(job_id: str) -> list[list[str]]:
    """[state, exit code, raw job id] of every run of a job, requeues included, oldest first (the raw id
    is SLURM_JOB_ID inside the job: an array task's own number)."""
    out = slurm_command(["sacct", "-j", str(job_id), "-D", "-X", "-n", "-P", "-o", "State,ExitCode,JobIDRaw"])
    return parse_sacct(out, 2)  # the raw id may be missing (older accounting records)


def check_submission(qos: str | None, account: str | None, partition: str | None) -> None:
    """Ask the scheduler (`sbatch --test-only`) whether these settings are valid; raise with its reason."""
    args = ["sbatch", "--test-only", "--wrap", "true"]
    for flag, value in (("--qos", qos), ("--account", account), ("--partition", partition)):
        if value:
            args.append(f"{flag}={value}")
    try:
        slurm_command(args)
    except SlurmError as e:
        raise SlurmError(
            f"the scheduler refuses qos={qos!r} account={account!r} partition={partition!r}: {e}"
        ) from None
