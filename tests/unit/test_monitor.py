"""The monitor over recorded sacct/scontrol outputs: judge each end once, requeue per policy, one monitor per directory."""

import json

import pytest

from hydra_preempt import cli
from hydra_preempt.doors.hydra_sweep import SweepJob, save_manifest
from hydra_preempt.doors.monitor import (
    JobRun,
    Monitor,
    MonitorBusyError,
    Slurm,
    judge,
    parse_exit_code,
    run_events,
    watched_jobs,
)
from hydra_preempt.errors import HydraPreemptError
from hydra_preempt.rundir import JobIdentity, RunHistory, RunLog, read_events
from hydra_preempt.slurm import commands
from hydra_preempt.slurm.failures import FailureTable

TABLE = FailureTable.load()
JOB = "4242"


class RecordedSlurm:
    """Answers SLURM's commands with recorded outputs; keeps the commands it was given."""

    def __init__(self, monkeypatch, sacct: str, stderr_path=None, live_state=None, live_exit_code="0:0"):
        self.sacct = sacct
        self.live_exit_code = live_exit_code
        self.stderr_path = stderr_path
        self.live_state = live_state  # scontrol's JobState (None: the controller does not know the job)
        self.calls: list[list[str]] = []
        monkeypatch.setattr(commands, "slurm_command", self.answer)

    def answer(self, args, timeout=30.0):
        self.calls.append(args)
        if args[0] == "sacct":
            return self.sacct
        if args[:3] == ["scontrol", "show", "job"]:
            if self.stderr_path is None and self.live_state is None:
                raise commands.SlurmError("scontrol: error: Invalid job id specified")
            state = self.live_state or "FAILED"
            return (
                f"JobId={JOB} JobName=train JobState={state} ExitCode={self.live_exit_code} "
                f"StdErr={self.stderr_path} StdOut={self.stderr_path}\n"
            )
        if args[:2] == ["scontrol", "requeue"]:
            return ""
        raise AssertionError(f"unexpected command {args}")

    @property
    def requeues(self):
        return [c for c in self.calls if c[:2] == ["scontrol", "requeue"]]


def started_run(run_dir, **stop):
    run_dir.mkdir(exist_ok=True)
    log = RunLog(run_dir, JobIdentity(JOB, 0))
    log.append("start", checkpoint_dir=str(run_dir / "checkpoints"))
    if stop:
        log.append("stop", **stop)
    return run_dir


def test_sacct_exit_codes():
    assert (parse_exit_code("0:0"), parse_exit_code("1:0"), parse_exit_code("0:9"), parse_exit_code("")) == (
        0,
        1,
        0,
        None,
    )


def test_a_node_failure_is_requeued_after_its_backoff_once(tmp_path, monkeypatch):
    run_dir = started_run(tmp_path)
    slurm = RecordedSlurm(monkeypatch, "")  # just submitted: not in the accounting yet
    monitor = Monitor(run_dir, TABLE, Slurm())
    assert monitor.poll(now=990.0) == [f"job {JOB} ({run_dir}): sacct knows no run of it (poll 1/10 without an answer)"]
    assert not monitor.settled
    slurm.sacct = "RUNNING|0:0\n"
    assert monitor.poll(now=1000.0) == [] and not monitor.settled

    slurm.sacct = "NODE_FAIL|0:0\n"
    [line] = monitor.poll(now=1010.0)
    assert "ended NODE_FAIL: node_fail (SLURM state NODE_FAIL); node_fail: restart (attempt 1/3)" in line
    assert slurm.requeues == []  # backoff_s 60
    assert monitor.poll(now=1071.0) == [f"job {JOB} ({run_dir}): requeued"]
    assert slurm.requeues == [["scontrol", "requeue", JOB]]
    assert monitor.poll(now=1200.0) == [] and len(slurm.requeues) == 1
    failure = next(e for e in read_events(run_dir) if e["event"] == "failure")
    assert (failure["failure"], failure["by"], failure["job_state"]) == ("node_fail", "monitor", "NODE_FAIL")
    assert RunHistory.read(run_dir).failure_count("node_fail") == 1
    monitor.close()

    # the state survives the monitor: a new one judges the same end no more
    again = Monitor(run_dir, TABLE, Slurm())
    assert again.poll(now=2000.0) == [] and len(slurm.requeues) == 1
    again.close()


def test_a_spent_budget_stops_with_the_reason(tmp_path, monkeypatch):
    run_dir = started_run(tmp_path)
    for _ in range(3):
        RunLog(run_dir).append("failure", failure="node_fail")
    slurm = RecordedSlurm(monkeypatch, "REQUEUED|0:0\nNODE_FAIL|0:0\n")
    monitor = Monitor(run_dir, TABLE, Slurm())
    [line] = monitor.poll(now=0.0)
    assert line.endswith("node_fail: retry budget exhausted (attempt 4/3)")
    assert monitor.poll(now=1e6) == [] and slurm.requeues == [] and monitor.settled
    monitor.close()


def test_the_jobs_own_decision_is_followed_not_made_again(tmp_path, monkeypatch):
    why = "nccl: retry budget exhausted (attempt 4/3)"
    run_dir = started_run(
        tmp_path, reason="failed", exit_code=1, failure="nccl", evidence="log: ...", restart=False, restart_reason=why
    )
    slurm = RecordedSlurm(monkeypatch, "FAILED|1:0\n")
    monitor = Monitor(run_dir, TABLE, Slurm())
    [line] = monitor.poll(now=0.0)
    assert line.endswith(f"decided by the job: {why}") and slurm.requeues == [] and monitor.settled
    assert [e["event"] for e in read_events(run_dir)] == ["start", "stop"]
    monitor.close()


def test_a_host_oom_kill_is_read_from_the_jobs_log_and_not_restarted(tmp_path, monkeypatch):
    log = tmp_path / "slurm-4242.out"
    log.write_text(
        "step 10 loss 0.3\nslurmstepd: error: Detected 1 oom_kill event in StepId=4242.0. "
        "Some of the step tasks have been OOM Killed.\n"
    )
    run_dir = started_run(tmp_path / "run")
    slurm = RecordedSlurm(monkeypatch, "FAILED|0:125\n", stderr_path=log)
    monitor = Monitor(run_dir, TABLE, Slurm())
    [line] = monitor.poll(now=0.0)
    assert "oom_host (log: slurmstepd: error: Detected 1 oom_kill event" in line and line.endswith("not restarted")
    assert slurm.requeues == []
    monitor.close()


def test_a_process_killed_without_a_word_is_restarted_and_an_earlier_starts_log_is_not_read_again(
    tmp_path, monkeypatch
):
    log = tmp_path / "slurm-4242.out"
    log.write_text("[rank0]:[E1127 10:02:11 ProcessGroupNCCL.cpp:616] Watchdog caught collective operation timeout\n")
    run_dir = started_run(tmp_path / "run")
    slurm = RecordedSlurm(monkeypatch, "FAILED|134:0\n", stderr_path=log)
    monitor = Monitor(run_dir, TABLE, Slurm())
    [line] = monitor.poll(now=0.0)
    assert "nccl (log: [rank0]" in line and line.endswith("nccl: restart (attempt 1/3)")
    assert monitor.poll(now=31.0) == [f"job {JOB} ({run_dir}): requeued"]  # after the backoff

    RunLog(run_dir, JobIdentity(JOB, 1)).append("start", checkpoint_dir=str(run_dir / "checkpoints"))
    with log.open("a") as f:
        f.write("srun: error: vm: task 0: Killed\n")
    slurm.sacct = "REQUEUED|0:0\nFAILED|9:0\n"
    [line, requeued] = monitor.poll(now=40.0)
    assert "ended FAILED: killed (run log: this start wrote no stop); killed: restart (attempt 1/3)" in line
    assert requeued.endswith("requeued") and len(slurm.requeues) == 2
    monitor.close()


def test_a_preemption_slurm_requeues_itself_is_no_end_while_the_controller_says_the_job_is_active(
    tmp_path, monkeypatch
):
    # PreemptMode=REQUEUE as measured: sacct says PREEMPTED ~14 s before the next run is recorded
    run_dir = started_run(tmp_path, reason="preempted", exit_code=75)
    slurm = RecordedSlurm(monkeypatch, "PREEMPTED|0:0\n", live_state="COMPLETING")
    monitor = Monitor(run_dir, TABLE, Slurm())
    assert monitor.poll(now=0.0) == [] and not monitor.settled
    slurm.live_state = "PENDING"
    assert monitor.poll(now=1.0) == [] and slurm.requeues == []
    RunLog(run_dir, JobIdentity(JOB, 1)).append("start", checkpoint_dir=str(run_dir / "checkpoints"))
    RunLog(run_dir, JobIdentity(JOB, 1)).append("stop", reason="finished", exit_code=0)
    slurm.sacct, slurm.live_state = "PREEMPTED|0:0\nCOMPLETED|0:0\n", "COMPLETED"
    [line] = monitor.poll(now=2.0)
    assert "ended COMPLETED: finished" in line and monitor.settled and slurm.requeues == []
    monitor.close()


def test_a_restart_due_is_not_requeued_when_the_job_already_runs_again(tmp_path, monkeypatch):
    run_dir = started_run(tmp_path)
    slurm = RecordedSlurm(monkeypatch, "NODE_FAIL|0:0\n")
    monitor = Monitor(run_dir, TABLE, Slurm())
    assert "node_fail: restart (attempt 1/3)" in monitor.poll(now=0.0)[0]
    slurm.live_state = "PENDING"  # requeued by a person during the backoff
    assert monitor.poll(now=61.0) == [f"job {JOB} ({run_dir}): PENDING again, not requeued"]
    assert slurm.requeues == [] and monitor.poll(now=62.0) == []
    monitor.close()


def test_a_launch_failure_is_not_blamed_on_the_last_stop_of_an_earlier_start():
    history = RunHistory(
        (
            {"event": "start", "job_id": JOB},
            {"event": "stop", "reason": "hang", "failure": "hang", "restart": True, "restart_reason": "hang: restart"},
        )
    )
    text = "srun: error: Unable to create step for job 4242: Job/step already completing or completed"
    # the job's second run (restart count 1) never started: the first run's stop says nothing about it
    verdict = judge(TABLE, "FAILED", 1, history, text, run_events(history, JobRun("FAILED", 1, 2)))
    assert (verdict.action, verdict.failure, verdict.record) == ("restart", "launch_failure", True)
    attempt = run_events(history, JobRun("FAILED", 1, 1))
    assert judge(TABLE, "FAILED", 1, history, text, attempt).reason == "decided by the job: hang: restart"
    assert run_events(history, JobRun("FAILED", 1, 1, raw_id="999")) is None  # another job's run


def test_a_job_cancelled_while_pending_after_a_requeue_is_not_judged_by_the_earlier_runs_stop_or_log(
    tmp_path, monkeypatch
):
    log = tmp_path / "slurm-4242.out"
    log.write_text("hydra_preempt: hang: no progress for 612 s in the step after step 10\n")
    run_dir = started_run(tmp_path / "run", reason="hang", failure="hang", restart=True, restart_reason="hang: restart")
    slurm = RecordedSlurm(monkeypatch, "REQUEUED|0:0\n", stderr_path=log, live_state="PENDING")
    monitor = Monitor(run_dir, TABLE, Slurm())
    assert monitor.poll(now=0.0) == []  # requeued by the watchdog: pending, no end
    slurm.sacct, slurm.live_state = "REQUEUED|0:0\nCANCELLED by 1000|0:0\n", "CANCELLED"  # scancel while pending
    [line] = monitor.poll(now=1.0)
    assert "ended CANCELLED by 1000: cancelled (SLURM state CANCELLED); cancelled: not restarted" in line
    assert slurm.requeues == [] and monitor.settled
    monitor.close()


def test_a_requeue_that_keeps_failing_is_given_up_and_the_monitor_settles(tmp_path, monkeypatch):
    run_dir = started_run(tmp_path)
    slurm = RecordedSlurm(monkeypatch, "FAILED|9:0\n")
    monitor = Monitor(run_dir, TABLE, Slurm())

    def forgotten(args, timeout=30.0):
        if args[:2] == ["scontrol", "requeue"]:
            raise commands.SlurmError("scontrol: error: Invalid job id specified")
        return slurm.answer(args, timeout)

    monkeypatch.setattr(commands, "slurm_command", forgotten)
    lines = [line for t in range(5) for line in monitor.poll(now=float(t))]
    assert (
        "killed: restart (attempt 1/3)" in lines[0]
        and lines[1:3] == [f"job {JOB} ({run_dir}): scontrol: error: Invalid job id specified"] * 2
    )
    assert lines[3] == f"job {JOB} ({run_dir}): not requeued: scontrol: error: Invalid job id specified; resubmit it"
    assert len(lines) == 4 and monitor.settled
    assert [e["event"] for e in read_events(run_dir)][-1] == "requeue_failed"
    monitor.close()


def test_a_finished_run_is_settled(tmp_path, monkeypatch):
    run_dir = started_run(tmp_path, reason="finished", exit_code=0)
    RecordedSlurm(monkeypatch, "COMPLETED|0:0\n")
    monitor = Monitor(run_dir, TABLE, Slurm())
    assert "finished" in monitor.poll(now=0.0)[0] and monitor.settled
    monitor.close()


def test_a_sweep_directory_watches_its_slurm_jobs(tmp_path):
    a, b = tmp_path / "0", tmp_path / "1"
    save_manifest(tmp_path, {0: SweepJob(0, ["lr=1"], str(a), "slurm", "11"), 1: SweepJob(1, [], str(b), "slurm")})
    assert [(w.run_dir, w.job_id) for w in watched_jobs(tmp_path)] == [(a, "11")]


def test_a_second_monitor_of_a_directory_is_refused(tmp_path, capsys):
    run_dir = started_run(tmp_path)
    first = Monitor(run_dir, TABLE, Slurm())
    with pytest.raises(MonitorBusyError, match="already monitored by pid"):
        Monitor(run_dir, TABLE, Slurm())
    assert cli.main(["monitor", str(run_dir), "--once"]) == 2
    first.close()
    err = capsys.readouterr().err
    assert err.startswith("hydra-preempt: ") and "already monitored" in err and err.count("\n") == 1


def test_a_monitor_of_one_run_of_a_watched_sweep_is_refused_and_the_other_way_round(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    run_dir = started_run(sweep / "0")
    save_manifest(sweep, {0: SweepJob(0, [], str(run_dir), "slurm", JOB)})
    whole = Monitor(sweep, TABLE, Slurm())
    with pytest.raises(MonitorBusyError, match=f"{run_dir} is already monitored by pid"):
        Monitor(run_dir, TABLE, Slurm())
    whole.close()
    one = Monitor(run_dir, TABLE, Slurm())
    with pytest.raises(MonitorBusyError):
        Monitor(sweep, TABLE, Slurm())
    Monitor(sweep, TABLE, Slurm(), jobs=[]).close()  # the launcher's monitor of other jobs of the sweep
    one.close()


def test_a_directory_that_is_no_sweep_nor_run_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["monitor", str(tmp_path), "--once"]) == 2
    err = capsys.readouterr().err
    assert "is neither a sweep directory" in err and err.count("\n") == 1


def test_a_broken_state_file_is_one_line(tmp_path):
    run_dir = started_run(tmp_path)
    (run_dir / ".monitor-state.json").write_text(json.dumps([1, 2]))
    with pytest.raises(HydraPreemptError, match="is not a monitor state; move it aside"):
        Monitor(run_dir, TABLE, Slurm())
    (run_dir / ".monitor-state.json").unlink()
    Monitor(run_dir, TABLE, Slurm()).close()  # the refused one let go of the lock


def test_a_run_the_accounting_still_shows_pending_but_the_controller_saw_fail_is_judged_by_its_last_words(
    tmp_path, monkeypatch
):
    """sacct lags behind the controller under load: a first run that failed at once (a step launch
    failure) still shows PENDING there. Judged by the controller's end and the log, not skipped as a
    waiting run (its log was taken for older words and the end judged `unknown`, not restarted)."""
    log = tmp_path / "slurm-4242.out"
    log.write_text("srun: error: Unable to create step for job 4242: Job/step already completing\n")
    run_dir = started_run(tmp_path / "run")  # it started, and its srun step could not be made
    RecordedSlurm(monkeypatch, "PENDING|0:0\n", stderr_path=log, live_state="FAILED", live_exit_code="1:0")
    monitor = Monitor(run_dir, TABLE, Slurm())
    [line] = monitor.poll(now=0.0)
    assert "launch_failure: restart" in line, line  # requeued after the class's backoff
    monitor.close()
