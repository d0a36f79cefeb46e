"""The Checkpointer's writer thread: writes run one after the other on one kept thread; after stop() a
stalled write keeps its thread, and a later write gets a thread (and a queue) of its own."""

import threading

from hydra_preempt.checkpoint.checkpointer import _Writer


def test_writes_share_one_thread_and_a_stalled_one_never_takes_a_later_write():
    writer = _Writer()
    names: list[str] = []
    first, second = threading.Event(), threading.Event()
    writer.submit(lambda: names.append(threading.current_thread().name) or first.set())
    writer.submit(lambda: names.append(threading.current_thread().name) or second.set())
    assert first.wait(10) and second.wait(10) and names == ["checkpoint-writer"] * 2
    kept = writer._thread

    release, stalled_ran, later_ran = threading.Event(), [], threading.Event()
    writer.submit(lambda: release.wait(10) and stalled_ran.append(threading.current_thread()))
    writer.stop()  # the stalled write keeps the old thread
    writer.submit(later_ran.set)
    assert later_ran.wait(10)  # done while the stalled write still waits: on a new thread
    assert writer._thread is not kept
    release.set()
    kept.join(10)
    assert not kept.is_alive() and stalled_ran == [kept]  # the old thread ended after its write
    writer.stop()
