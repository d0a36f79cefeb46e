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

A Python handler runs only when the main thread runs Python code: in a
collective whose peer died (gloo blocks in C++) it never runs. So that another
thread still learns of a stop (`arrived`), the interpreter's own C handler
also writes each signal's number into a pipe (`signal.set_wakeup_fd`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import sys
import threading
import time
import weakref
from types import FrameType

from ..config import check_signal_name
from ..errors import ConfigError
from .child_signals import lift_shield, shield_forked_child

log = logging.getLogger("hydra_preempt")


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
        self.first_signal: dict[Request, signal.Signals] = {}  # the signal that made each request first
        self._previous: dict[signal.Signals, object] = {}
        self._wakeup: tuple[int, int] | None = None  # the pipe the C handler writes signal numbers into
        self._arrived: tuple[Request, signal.Signals] | None = None  # the first stop read from it
        self._arrived_at: tuple[int, int] | None = None  # where the main thread was when it was read
        self._fork_hooks = False
        self._mask_before_fork: set[int | signal.Signals] | None = None  # the blocked mask's predecessor, while forking

    def install(self) -> None:
        """Install the handlers (again: nothing), and the pipe `arrived` reads."""
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("the training session must run in the main thread: only it can receive signals")
        if self._previous:
            return
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)  # the C handler must never block on a full pipe
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        if previous == -1:
            self._wakeup = (read, write)
        else:  # the program's own event loop reads signals from its pipe: it keeps it, we go without
            signal.set_wakeup_fd(previous)
            os.close(read)
            os.close(write)
            log.warning(
                "signal.set_wakeup_fd is in use by the program: a stop signal the training thread cannot "
                "reach (stuck in a collective) ends the process without a stop in the run log"
            )
        guard = sys.modules.get("hydra_preempt.guard")  # imported by the program first: it holds earlier signals
        for signum in self._meaning:
            handler: object = signal.signal(signum, self._handle)
            came_at: float | None = None
            if guard is not None:
                handler, came_at = guard.taken_over(signum, handler)
            self._previous[signum] = handler
            if came_at is not None:  # before run(): a stop during start-up
                self._note(signum, came_at)
        lift_shield()  # a run inside a shielded worker process (child_signals.py) hears its own signals now
        if not self._fork_hooks:  # once per instance; weak references, so that the hooks keep nothing alive
            hooks = [weakref.WeakMethod(m) for m in (self._before_fork, self._after_fork, self._forget_in_child)]
            before, parent, child = [lambda ref=ref: (method := ref()) is not None and method() for ref in hooks]
            os.register_at_fork(before=before, after_in_parent=parent, after_in_child=child)
            self._fork_hooks = True

    # A process forked from this one gets no wakeup pipe (it would write its signals into this
    # process's) and none of these handlers; one that multiprocessing forked (a DataLoader worker, a
    # pool worker) is shielded from the stop signals of anyone but its parent (child_signals.py).
    # The stop signals are blocked across the fork, so that one sent to the child at once waits for that.
    def _before_fork(self) -> None:
        self._mask_before_fork = signal.pthread_sigmask(signal.SIG_BLOCK, self._previous) if self._previous else None

    def _after_fork(self) -> None:
        mask, self._mask_before_fork = self._mask_before_fork, None
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _forget_in_child(self) -> None:
        mask, self._mask_before_fork = self._mask_before_fork, None
        if mask is None:  # no run's handlers were installed at the fork
            return
        stop_signals = list(self._previous)
        with contextlib.suppress(ValueError, OSError):  # not the child's main thread: it keeps the handlers
            self.uninstall()
        shield_forked_child(stop_signals, mask)

    def uninstall(self) -> None:
        """Restore the handlers that were there before install() (also after hold())."""
        try:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]
        finally:
            self._previous.clear()
            self._release_wakeup()

    def _release_wakeup(self) -> None:
        """Give the wakeup fd back and close the pipe (nothing reads it any more)."""
        if self._wakeup is not None:
            with contextlib.suppress(ValueError):  # not the main thread (a forked child's other thread)
                signal.set_wakeup_fd(-1)
            for fd in self._wakeup:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wakeup = None

    def hold(self) -> None:
        """The run finished: from now on these signals are ignored, until uninstall().

        Restoring the previous handlers here would hand a late SIGTERM to SIG_DFL, which kills the
        finishing process (exit -15 instead of 0). SIG_IGN, not a Python handler: the interpreter
        resets its Python handlers to SIG_DFL early in its shutdown, before the modules (torch) are
        torn down, which would open the window again; an ignored signal stays ignored to the end.
        """
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)
        # An ignored signal reaches no C handler, so the pipe would stay empty; the program (or the next
        # run in this process) may want the wakeup fd for its own event loop.
        self._release_wakeup()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._note(signal.Signals(signum), time.time())
        outer = self._previous.get(signal.Signals(signum))
        if isinstance(getattr(outer, "__self__", None), SignalRequests):  # a run inside a run: the outer one's too
            outer(signum, frame)  # type: ignore[operator]

    def _note(self, signum: signal.Signals, at: float) -> None:
        request = self._meaning[signum]
        self._pending.setdefault(request, signum)
        self.first_received.setdefault(request, at)
        self.first_signal.setdefault(request, signum)

    def retake(self) -> list[signal.Signals]:
        """The stop signals whose handler the program replaced after install() (its own signal.signal,
        asyncio's loop.add_signal_handler): this instance's handler again. Called at each step boundary:
        a replaced handler would end the process at the kill with nothing saved. A wakeup fd asyncio took
        stays asyncio's (its other signals' handlers read it); the watchdog then learns of a stop only
        through this handler, as when the fd was the program's before install()."""
        taken = [s for s in self._previous if signal.getsignal(s) != self._handle]
        for signum in taken:
            signal.signal(signum, self._handle)
        return taken

    def take(self) -> dict[Request, signal.Signals]:
        """The requests recorded since the last call, each with the signal that made it."""
        taken, self._pending = self._pending, {}
        return taken

    def peek(self) -> set[Request]:
        return set(self._pending)

    def arrived(self) -> tuple[Request, signal.Signals] | None:
        """The first stop (preempt or cancel) whose signal reached the process, with the signal, whether
        or not the main thread ran its handler. For one other thread (the watchdog's): it reads the pipe,
        at each call.

        A forked child (multiprocessing's fork start method) shares the pipe and, until it execs, the
        C handler: a SIGTERM to the child (`pool.terminate()`) writes into it too. Such a signal is told
        apart by the main thread: a signal to this process runs its Python handler as soon as the main
        thread runs Python code; so once the main thread has moved on in Python since the signal was
        read and the handler did not record it, it was another process's, and it is forgotten. A main
        thread that has not moved (stuck in a collective's C code) cannot tell: the stop stands."""
        if self._arrived is None and self._wakeup is not None:
            with contextlib.suppress(BlockingIOError):
                for signum in os.read(self._wakeup[0], 4096):
                    request = self._meaning.get(signum)  # type: ignore[call-overload]
                    if request in (Request.PREEMPT, Request.CANCEL):
                        self._arrived = (request, signal.Signals(signum))
                        self._arrived_at = _main_thread_position()
                        break
        unrecorded = self._arrived is not None and self._arrived[0] not in self.first_received
        if unrecorded and _main_thread_position() != self._arrived_at:
            assert self._arrived is not None
            log.info("a %s reached another process sharing this one's signal pipe: ignored", self._arrived[1].name)
            self._arrived = None
        return self._arrived


def _main_thread_position() -> tuple[int, int] | None:
    """The main thread's innermost Python frame and instruction: unchanged while it waits in C code."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    return None if frame is None else (id(frame), frame.f_lasti)
