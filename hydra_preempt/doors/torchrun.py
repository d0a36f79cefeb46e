"""`hydra-preempt torchrun ARGS`: torchrun, with its agent out of the stop protocol's way.

Under plain torchrun a preemption goes wrong twice: the agent handles SIGTERM itself (it raises
SignalException, sends its workers SIGTERM and kills them 30 s later, whatever the grace time), and
the workers' exit 75 ("requeue me") comes out of the agent as exit 1 with a long traceback. torchrun
starts each worker in a session of its own, so a signal to the agent's process group (slurmstepd's
with proctrack/pgid, `kill -- -PGID`, a terminal's Ctrl-C) reaches the agent alone. Here the agent
handles SIGHUP and SIGQUIT as torchrun does, and passes each stop signal (SIGTERM, SIGINT, SIGUSR1,
SIGUSR2) on to every worker's process group, nothing more: the workers stop at their step boundary
with a checkpoint, as without torchrun, and the agent exits with the code they agreed on (75, 130,
76), or 1 with torch's own report for anything else. `--max-restarts` must stay 0: a stopped run is
continued by the requeue, not by the agent in an allocation that is being taken back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from ..outcome import ExitCode

# The codes a stopped run asks its process to exit with: passed on as they are.
STOP_CODES = {int(ExitCode.REQUEUE), int(ExitCode.CANCELLED), int(ExitCode.HANG)}
AGENT_SIGNALS = "SIGHUP,SIGQUIT"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def agreed_exit_code(first: int, others: list[int]) -> int:
    """The agent's exit code for its failed workers: the first failure's, where that is a stop code and
    every other worker ended with a stop code too or by the agent's teardown after that first failure
    (SIGTERM, then SIGKILL); else 1."""
    teardown = {-int(signal.SIGTERM), -int(signal.SIGKILL)}
    if first in STOP_CODES and all(code in STOP_CODES | teardown for code in others):
        return first
    return int(ExitCode.FAILED)


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def pass_on(signum: int, frame: FrameType | None) -> None:
    """The agent's handler of a stop signal: to each worker's process group (torchrun's workers lead
    sessions of their own), whose run decides what it means."""
    for worker in children(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker, signum)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    if args.max_restarts != 0:
        print(
            "hydra-preempt torchrun: --max-restarts must be 0: a stopped run is continued by the requeue",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    args.signals_to_handle = AGENT_SIGNALS
    for signum in STOP_SIGNALS:
        signal.signal(signum, pass_on)  # a worker starts with the default actions (exec resets handlers)
    try:
        run(args)
    except ChildFailedError as e:
        first_rank, first = e.get_first_failure()
        others = [failure.exitcode for rank, failure in e.failures.items() if rank != first_rank]
        code = agreed_exit_code(first.exitcode, others)
        if code == ExitCode.FAILED:
            print(e.format_msg(), file=sys.stderr)
        else:
            print(f"hydra-preempt torchrun: the workers exited {code}", file=sys.stderr)
        return code
    return ExitCode.FINISHED
