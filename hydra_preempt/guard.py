"""A stop signal during the start-up window, before `run()` installs its handlers, is kept for `run()`.

A training process spends its first seconds in Python's start and its imports (`import torch` alone is
about two thirds of 2 to 3 s on a 2-core machine). A SIGTERM then (a preemption of a job that has just
been requeued) would end the process with exit code 143 and not a word: under a QoS whose PreemptMode
is CANCEL nothing requeues it. Imported first, before torch,

    import hydra_preempt.guard  # noqa: F401  (the first import of a training script)

this module handles the stop signals that still have their default action (SIGTERM, SIGUSR2; SIGINT
keeps Python's KeyboardInterrupt for a person at a terminal) by recording them and saying so in one
line; `run()` then takes them over (`taken_over`) and stops before the training function starts, as
for a stop during its own start-up: exit 75 and, under SLURM, the requeue. A process that imports this
module must call `run()` (or `release()`): until it does, these signals no longer end it.

The record is this process's own (a signal reaches a process, not an object), so it lives in the module.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

_GUARDED = (signal.SIGTERM, signal.SIGUSR2)
_received: list[tuple[signal.Signals, float]] = []  # each signal that came before run(), with its time.time()


def _restore_defaults() -> None:
    """The default actions again; also in a process forked before run() (a pool started during the
    imports), which is no training run: `terminate()` must end it."""
    for signum in _GUARDED:
        if signal.getsignal(signum) is _record:
            signal.signal(signum, signal.SIG_DFL)


def _record(signum: int, frame: FrameType | None) -> None:
    sig = signal.Signals(signum)
    if not any(s is sig for s, _ in _received):
        _received.append((sig, time.time()))
        os.write(2, f"[hydra_preempt] {sig.name} during start-up: the run stops as soon as run() starts\n".encode())


def taken_over(signum: signal.Signals, previous: object) -> tuple[object, float | None]:
    """For run()'s handlers, which replaced `previous` for `signum`: the handler to restore after the run
    (the default one, where `previous` was this guard's) and the time `signum` came before run(), if it did."""
    if previous is not _record:
        return previous, None
    return signal.SIG_DFL, next((at for s, at in _received if s is signum), None)


# While this guard's handlers stand, the guarded signals are blocked across a fork, so that one sent to
# the child at once meets the default action the child gets, not this module's handler (which would
# drop it there); the mask of before the fork, while forking:
_mask_at_fork: list[set[int | signal.Signals]] = []


def _before_fork() -> None:
    if any(signal.getsignal(s) is _record for s in _GUARDED):
        _mask_at_fork.append(signal.pthread_sigmask(signal.SIG_BLOCK, _GUARDED))


def _after_fork() -> None:
    if _mask_at_fork:
        signal.pthread_sigmask(signal.SIG_SETMASK, _mask_at_fork.pop())


def _after_fork_in_child() -> None:
    if _mask_at_fork:
        _restore_defaults()
    _after_fork()


def release() -> None:
    """This process trains in no run() after all (a Hydra sweep's driver process): the default actions
    again, and a signal that came meanwhile takes effect now."""
    _restore_defaults()
    for signum, _ in _received:
        os.kill(os.getpid(), signum)


if threading.current_thread() is threading.main_thread():
    for _signum in _GUARDED:
        if signal.getsignal(_signum) is signal.SIG_DFL:
            signal.signal(_signum, _record)
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork_in_child)
