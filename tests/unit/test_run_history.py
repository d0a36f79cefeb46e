"""What the run log says about a run's interruptions: where a plot marks each restart and why."""

from hydra_preempt.rundir import RunHistory


def history(*events):
    return RunHistory(tuple({"event": e[0], **e[1]} for e in events))


def test_every_restart_is_marked_at_the_step_it_resumed_from_with_its_reason():
    h = history(
        ("start", {}),
        ("stop", {"reason": "preempted", "step": 13, "checkpoint_step": 13}),
        ("requeue", {"step": 13}),
        ("start", {}),
        ("stop", {"reason": "timeout", "step": 40, "checkpoint_step": 40}),
        ("start", {}),
        ("stop", {"reason": "failed", "failure": "nccl", "step": 47, "checkpoint_step": 45}),
        ("start", {}),  # killed without a word: no stop before the next start
        ("start", {}),
        ("stop", {"reason": "finished", "step": 100, "checkpoint_step": 100, "resumed_from": 90}),
    )
    assert h.interruptions() == [(13, "preempted"), (40, "timeout"), (45, "nccl"), (90, "killed")]


def test_a_run_that_was_never_interrupted_has_no_marks():
    assert history(("start", {}), ("stop", {"reason": "finished", "checkpoint_step": 5})).interruptions() == []
    assert history(
        ("start", {}), ("stop", {"reason": "preempted", "checkpoint_step": None}), ("start", {})
    ).interruptions() == [(0, "preempted")]
