"""What the run log says about a run's interruptions: where a plot marks each restart and why; the metrics log rewound at a start."""

import json

from hydra_preempt.rundir import METRICS_LOG, MetricsLog, RunHistory, read_metrics


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


def test_the_checkpoint_directory_is_found_from_the_run_directory_given(tmp_path):
    import pytest

    from hydra_preempt.errors import ConfigError
    from hydra_preempt.rundir import RunLog, checkpoint_dir_of

    def run(name, **start):
        run_dir = tmp_path / name
        run_dir.mkdir()
        if start:
            RunLog(run_dir).append("start", **start)
        return run_dir

    assert checkpoint_dir_of(run("never-started")) == tmp_path / "never-started" / "checkpoints"
    original = str(tmp_path / "original")
    copy = run("copy", checkpoint_dir=f"{original}/ckpt", run_dir=original)
    assert checkpoint_dir_of(copy) == copy / "ckpt"  # inside the run: the copy's own
    shared = run("shared", checkpoint_dir="/scratch/ckpt", run_dir=original)
    assert str(checkpoint_dir_of(shared)) == "/scratch/ckpt"  # outside it: as recorded
    # a log from before the run directory was recorded: only an absolute path
    (tmp_path / "elsewhere" / "checkpoints").mkdir(parents=True)
    old = run("old", checkpoint_dir=str(tmp_path / "elsewhere" / "checkpoints"))
    assert checkpoint_dir_of(old) == tmp_path / "elsewhere" / "checkpoints"
    (old / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="ambiguous"):
        checkpoint_dir_of(old)


def test_a_start_rewinds_the_metrics_to_the_step_it_continues_from(tmp_path):
    """The lines of steps made again go (a SIGKILL after step 5, resumed from 3), with a line cut short by
    the kill; a line reported before the rewind by this start (its file open) does not send the later
    lines into a file no longer there."""
    path = tmp_path / METRICS_LOG
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.4}, {"step": 3, "val": 0.2}]
    lines += [{"step": 4, "loss": 0.3}, {"step": 5, "loss": 0.2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo')
    metrics = MetricsLog(tmp_path)
    metrics.append({"step": 0, "early": 1.0})  # report() before restore(): the file is open
    metrics.rewind(3)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in lines[:4])
    metrics.append({"step": 4, "loss": 0.25})
    metrics.close()
    assert read_metrics(tmp_path) == [*lines[:4], {"step": 4, "loss": 0.25}]
    metrics.rewind(0)  # nothing of step 0 or before: all goes
    assert path.read_text() == ""
    MetricsLog(tmp_path / "none").rewind(0)  # no file: none made
    assert not (tmp_path / "none" / METRICS_LOG).exists()


def test_the_cut_is_found_from_the_end_block_by_block(tmp_path):
    """Blocks smaller than a line, lines that are no metrics of this library (kept where they come before
    the cut), steps that are no integers: the same cut as a reading of the whole file."""
    from hydra_preempt.rundir import _end_of_last_line_up_to, _step_of

    records = [{"step": s, "pad": "x" * (s * 7 % 23)} for s in range(1, 9)]
    records[2:2] = [{"note": "by hand"}, {"step": True}, {"step": "3"}]
    text = ("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "cut').encode()
    path = tmp_path / "m"
    path.write_bytes(text)
    with open(path, "rb") as f:
        for step in range(0, 10):
            ends = [i + 1 for i, c in enumerate(text) if c == ord("\n")]
            starts = [0, *ends[:-1]]
            expected = max((e for s, e in zip(starts, ends) if (_step_of(text[s : e - 1]) or 99) <= step), default=0)
            for block in (5, 64, 1 << 16):
                assert _end_of_last_line_up_to(f.fileno(), len(text), step, block) == expected, (step, block)
