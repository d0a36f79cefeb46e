"""The stop signals in a run's worker processes: the main process alone decides what a stop means.

slurmstepd does not signal one process: at a preemption (and at `scancel --signal`, and at the
time-limit `--signal`) it signals every process of the job step, the DataLoader's workers and a
`multiprocessing.Pool`'s included. A worker that dies of that SIGTERM takes the run down with it:
torch's SIGCHLD handler raises "DataLoader worker (pid N) is killed by signal: Terminated." into
the training step (torch's own worker handler lets a SIGTERM end the worker unless its parent sent
it), and a pool whose worker died waits forever for that worker's task.

So a process that multiprocessing forks while a run's handlers are installed (DataLoader and
StatefulDataLoader workers, persistent or not, pool workers, a `Process`) is *shielded*: its
threads block the stop signals and one thread of its own takes them with `sigwaitinfo`, which tells
the sender. A stop signal from the child's parent (`Process.terminate()`, `pool.terminate()`, a
DataLoader ending a stuck worker) ends the child as the signal's default action would; one from
anyone else (slurmstepd, `kill -- -PGID`) is dropped, so the child keeps serving the main process
until the main process stops at its step boundary and shuts the child down. Once the parent is
gone, any stop signal ends the child.

Only multiprocessing's forks are shielded: they run Python to the end. Another fork (`os.fork`,
`subprocess` with a `preexec_fn`) may exec a program, which would inherit the blocked signals.
A child started by spawn or forkserver is a new program that no hook of this process reaches:
its death by the stop signal is part of the stop (Session.stop_behind), not a failure.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterable
from types import FrameType


class ChildShield(threading.Thread):
    """The thread that takes the stop signals of a shielded child (they are blocked in its other
    threads) and drops those not sent by `parent`. A child has at most one: the process's threads
    are where a run started inside the child finds it, to lift it."""

    def __init__(self, signals: Iterable[signal.Signals], parent: int) -> None:
        super().__init__(name="hydra_preempt-child-signals", daemon=True)
        self.signals = frozenset(signals)
        self.parent = parent
        self.lifted = False

    def run(self) -> None:
        while True:
            info = signal.sigwaitinfo(self.signals)
            signum = signal.Signals(info.si_signo)
            if self.lifted:  # a run of this child's own handles its signals now: hand this one over
                os.kill(os.getpid(), signum)
                return
            if info.si_pid == self.parent or os.getppid() != self.parent:
                self._end_by(signum)

    def _end_by(self, signum: signal.Signals) -> None:
        """End the process as the parent's `signum` would have: in a DataLoader worker (torch's or
        torchdata's), torch's C handler exits 0 for its parent's SIGTERM, as torch's shutdown expects (a
        worker killed by a signal makes the parent raise); otherwise this thread takes the signal
        unblocked, and its default action (each stop signal's terminates) or the child's own handler runs."""
        if signum is signal.SIGTERM and _in_dataloader_worker():
            os._exit(0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        signal.pthread_kill(threading.get_ident(), signum)  # delivered before this returns
        signal.pthread_sigmask(signal.SIG_BLOCK, {signum})  # a handler that did not end it: wait again

    def lift(self) -> None:
        """From the main thread: the process's stop signals are its own run's again."""
        self.lifted = True
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)


def shield_forked_child(signals: Iterable[signal.Signals], mask: Iterable[int | signal.Signals]) -> None:
    """In a child just forked (its only thread, inside os.fork()): shield it if multiprocessing forked
    it, else restore the signal `mask` of before the fork. A stop signal's Python handler of the
    parent's program (submitit's checkpoint handler, a door's) never runs in a child: the default
    action instead (SIG_IGN and Python's own SIGINT handler stay)."""
    signals = list(signals)
    for signum in signals:
        if signal.getsignal(signum) not in (signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, signal.SIG_DFL)
    if not _forked_by_multiprocessing(sys._getframe()):
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return
    # blocked in this thread, so in every thread started from now on (the shield's own included); a
    # process this child forks in turn gets them unblocked (it has no shield thread)
    signal.pthread_sigmask(signal.SIG_SETMASK, set(mask) | set(signals))
    os.register_at_fork(after_in_child=functools.partial(signal.pthread_sigmask, signal.SIG_SETMASK, set(mask)))
    ChildShield(signals, os.getppid()).start()


def lift_shield() -> None:
    """A run installs its handlers in a shielded child: its stop signals are that run's."""
    for thread in threading.enumerate():
        if isinstance(thread, ChildShield) and not thread.lifted:
            thread.lift()


def _in_dataloader_worker() -> bool:
    """Whether this process runs a DataLoader worker loop (torch's, or torchdata's, which sets torch's
    worker info too): the loop sets it before it serves a batch."""
    worker = sys.modules.get("torch.utils.data._utils.worker")
    return worker is not None and getattr(worker, "_worker_info", None) is not None


def _forked_by_multiprocessing(frame: FrameType | None) -> bool:
    """Whether this fork is multiprocessing's (Popen of the fork start method): its child runs a
    Process's target (a DataLoader worker, a pool worker) and never execs."""
    while frame is not None:
        if frame.f_globals.get("__name__") == "multiprocessing.popen_fork":
            return True
        frame = frame.f_back
    return False


def end_children_of_stopped_run(before: set[multiprocessing.process.BaseProcess]) -> int:
    """After a run that stopped (the scheduler signalled every process of the step): end the processes
    multiprocessing started during the run that are still alive (shielded, they dropped that signal),
    so that the process's exit does not wait on a non-daemonic one (multiprocessing joins those at exit).
    `before`: `multiprocessing.active_children()` at the run's start. Returns how many were ended."""
    left = [child for child in multiprocessing.active_children() if child not in before]
    for child in left:
        child.terminate()  # the parent's signal: a shielded child ends
    for child in left:
        child.join(5.0)
    return len(left)
