"""Signal handlers that only record requests; the session acts on them at the next step boundary.

    preempt signal (SIGTERM by default, or SIGUSR2/SIGHUP)  -> save, exit for requeue
    timeout signal (SIGUSR2 by default: submitit's
      --signal=USR2@lead before the time limit)              -> the same
    SIGTERM when another signal is the preempt signal         -> the same (it is SLURM's final warning)
    SIGUSR1                                                   -> save, keep training
    SIGINT                                                    -> save, exit without requeue

Whether a stop was a preemption, a time limit or a user's scancel is decided
afterwards from the scheduler's view of the job (see requeue.classify_stop).

Handlers never do I/O or raise: a signal that lands in the middle of a save
only sets a flag, and repeated signals set the same flag once.

After a finished run, `hold()` keeps these signals from killing the process
while it exits: a late SIGTERM must not turn exit code 0 into -15.
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from types import FrameType

from ..config import check_signal_name
from ..errors import ConfigError


class Request(enum.Enum):
    PREEMPT = "preempt"
    CHECKPOINT = "checkpoint"
    CANCEL = "cancel"


def parse_signal(name: str, key: str = "signals.preempt") -> signal.Signals:
    """'TERM', 'SIGTERM', 'usr2' -> the signal; only the ones that can mean 'stop for requeue'."""
    return signal.Signals[f"SIG{check_signal_name(name, key)}"]


class SignalRequests:
    """Installs the handlers and collects the requests they record."""

    def __init__(self, preempt_signal: str, timeout_signal: str) -> None:
        self.preempt_signal = parse_signal(preempt_signal)
        self.timeout_signal = parse_signal(timeout_signal, "signals.timeout")
        self._meaning = {
            signal.SIGTERM: Request.PREEMPT,
            self.preempt_signal: Request.PREEMPT,
            self.timeout_signal: Request.PREEMPT,
            signal.SIGUSR1: Request.CHECKPOINT,
            signal.SIGINT: Request.CANCEL,
        }
        self._pending: dict[Request, signal.Signals] = {}
        self.first_received: dict[Request, float] = {}  # wall-clock time.time()
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("the training session must run in the main thread: only it can receive signals")
        for signum in self._meaning:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers that were there before install() (also after hold())."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def hold(self) -> None:
        """The run finished: from now on these signals are ignored, until uninstall().

        Restoring the previous handlers here would hand a late SIGTERM to SIG_DFL, which kills the
        finishing process (exit -15 instead of 0). SIG_IGN, not a Python handler: the interpreter
        resets its Python handlers to SIG_DFL early in its shutdown, before the modules (torch) are
        torn down, which would open the window again; an ignored signal stays ignored to the end.
        """
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        request = self._meaning[signal.Signals(signum)]
        self._pending.setdefault(request, signal.Signals(signum))
        self.first_received.setdefault(request, time.time())

    def take(self) -> dict[Request, signal.Signals]:
        """The requests recorded since the last call, each with the signal that made it."""
        taken, self._pending = self._pending, {}
        return taken

    def peek(self) -> set[Request]:
        return set(self._pending)
