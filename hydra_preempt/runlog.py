"""The run log: one JSON line per start and stop of a run, appended in the run directory.

The run directory, not the job id, is a run's identity: the log survives
requeues (new job ids on some sites) and shows every restart with its reason.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path
from typing import Any

from .fsutil import append_line_durably

RUN_LOG = "run_log.jsonl"


def job_context() -> dict[str, Any]:
    """Who is running: SLURM job id and restart count when under SLURM, host and pid always."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "restart_count": int(restarts) if restarts.isdigit() else 0,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def append_event(run_dir: Path, event: str, **fields: Any) -> dict[str, Any]:
    record = {"event": event, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), **job_context(), **fields}
    append_line_durably(Path(run_dir) / RUN_LOG, json.dumps(record))
    return record


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """All events; a last line cut short by a kill is ignored."""
    path = Path(run_dir) / RUN_LOG
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events
