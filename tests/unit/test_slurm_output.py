"""Whatever scontrol, sacct and squeue print: non-UTF-8 bytes, nothing, lines that cannot be read, states
the monitor has no entry for. No traceback, nothing judged on a half answer, and the monitor ends."""

import os
import re

import pytest

from hydra_preempt import cli
from hydra_preempt.doors.monitor import Monitor, Slurm, monitor
from hydra_preempt.rundir import read_events
from hydra_preempt.slurm import commands
from hydra_preempt.slurm.commands import JOB_STATE_OUTCOME, SlurmError, parse_duration, parse_sacct, state_outcome
from hydra_preempt.slurm.env import SlurmTask
from hydra_preempt.slurm.policy import SlurmStopPolicy
from hydra_preempt.slurm.stop import RequeueBudget
from tests.unit.test_monitor import JOB, TABLE, RecordedSlurm, started_run

LATIN1_SHOW_JOB = (
    b"JobId=4242 JobName=entra\xeenement JobState=RUNNING Restarts=2 Requeue=1 QOS=pr\xe9empt TimeLimit=1:00:00"
)


def fake_tools(tmp_path, monkeypatch, **outputs):
    """Executables on PATH that print the given bytes (scontrol, sacct, sacctmgr)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, data in outputs.items():
        (bin_dir / f"{name}.out").write_bytes(data)
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\ncat {bin_dir / name}.out\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_latin1_job_name_is_read_with_a_replacement_character(tmp_path, monkeypatch):
    fake_tools(tmp_path, monkeypatch, scontrol=LATIN1_SHOW_JOB + b"\n")
    job = commands.show_job(JOB)
    assert (job.state, job.restarts, job.time_limit_s) == ("RUNNING", 2, 3600.0)
    assert job.fields["JobName"] == "entra\ufffdnement"


def test_a_latin1_error_of_a_failing_command_is_one_line(tmp_path):
    script = tmp_path / "fails"
    script.write_bytes(b"#!/bin/sh\nprintf 'no job caf\\351\\n' >&2\nexit 1\n")
    script.chmod(0o755)
    with pytest.raises(SlurmError, match=re.escape("no job caf\ufffd") + "$"):
        commands.slurm_command([str(script)])


def test_the_stop_policy_starts_with_a_latin1_job_name(tmp_path, monkeypatch):
    # scontrol show job and show config both answer this line; sacctmgr answers nothing usable
    fake_tools(tmp_path, monkeypatch, scontrol=LATIN1_SHOW_JOB + b"\nKillWait = 30 sec\n", sacctmgr=b"\xff|\xfe\n")
    policy = SlurmStopPolicy.start(SlurmTask(JOB, 0, 1, 0), {}, RequeueBudget(), "SIGTERM", "SIGUSR2")
    assert policy.facts.kill_wait_s == 30.0


def test_monitor_once_with_a_latin1_job_log_and_state(tmp_path, monkeypatch, capsys):
    log = tmp_path / "slurm-4242.out"
    log.write_bytes(b"step 3 caf\xe9\n")
    run_dir = started_run(tmp_path / "run")
    show = b"JobId=4242 JobName=caf\xe9 JobState=FAILED StdErr=" + str(log).encode() + b"\n"
    fake_tools(tmp_path, monkeypatch, scontrol=show, sacct=b"FAILED|1:0|4242\n")
    assert cli.main(["monitor", str(run_dir), "--once"]) == 0
    assert "ended FAILED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text",
    ["RUNNING\n", "|||\n", "COMPLETED|0:0|4242\nno bars here\n", " |0:0|4242\n"],
    ids=["no-bar", "empty-fields", "one-bad-line-of-two", "blank-state"],
)
def test_an_sacct_answer_with_a_line_that_cannot_be_read_is_no_answer(text):
    with pytest.raises(SlurmError, match="sacct's answer cannot be read"):
        parse_sacct(text, 2)


def test_an_sacct_line_short_of_the_columns_asked_is_no_answer():
    with pytest.raises(SlurmError, match=re.escape("cannot be read: 'FAILED|1:0'")):
        parse_sacct("FAILED|1:0\n", 3)


def test_sacct_lines_that_can_be_read():
    assert parse_sacct("", 3) == []
    assert parse_sacct("\nREQUEUED|0:0|7\nCANCELLED by 0|0:15|7|extra\n", 3) == [
        ["REQUEUED", "0:0", "7"],
        ["CANCELLED by 0", "0:15", "7", "extra"],
    ]


@pytest.mark.parametrize("value", ["1:xx", "-", "2-", ":", "1::2", "\u00b2", "5 days"])
def test_a_time_limit_that_is_no_duration_is_none(value):
    assert parse_duration(value) is None


def test_durations_still_read():
    assert (parse_duration("1-02:03:04"), parse_duration("30"), parse_duration("5:00")) == (93784.0, 1800.0, 300.0)


@pytest.mark.parametrize("sacct", ["", "RUNNING\n", "|||\n"], ids=["nothing", "no-bar", "empty-fields"])
def test_no_usable_answer_is_reported_each_poll_and_the_job_given_up_after_the_patience(tmp_path, monkeypatch, sacct):
    run_dir = started_run(tmp_path)
    slurm = RecordedSlurm(monkeypatch, sacct)
    watch = Monitor(run_dir, TABLE, Slurm(), patience=3)
    first, second = watch.poll(now=0.0), watch.poll(now=1.0)
    assert len(first) == 1 and first[0].endswith("(poll 1/3 without an answer)") and not watch.settled
    assert second[0].endswith("(poll 2/3 without an answer)")
    [last] = watch.poll(now=2.0)
    assert last.endswith(f"3 polls in a row; no longer followed (see `sacct -j {JOB}`)") and watch.settled
    assert watch.poll(now=3.0) == []  # given up: not asked again
    assert slurm.requeues == [] and [e["event"] for e in read_events(run_dir)] == ["start"]  # nothing judged
    watch.close()


def test_an_answer_resets_the_patience(tmp_path, monkeypatch):
    run_dir = started_run(tmp_path)
    slurm = RecordedSlurm(monkeypatch, "")
    watch = Monitor(run_dir, TABLE, Slurm(), patience=2)
    watch.poll(now=0.0)
    slurm.sacct, slurm.live_state = "RUNNING|0:0|4242\n", "RUNNING"
    assert watch.poll(now=1.0) == []
    slurm.sacct, slurm.live_state = "", None
    assert watch.poll(now=2.0)[0].endswith("(poll 1/2 without an answer)") and not watch.settled
    watch.close()


def test_a_job_the_accounting_does_not_know_yet_but_the_controller_does_is_waited_for(tmp_path, monkeypatch):
    """A pending array task (sacct -j 883_2 prints nothing until it runs): never given up while scontrol
    says it is pending."""
    run_dir = started_run(tmp_path)
    RecordedSlurm(monkeypatch, "", live_state="PENDING")
    watch = Monitor(run_dir, TABLE, Slurm(), patience=2)
    assert [watch.poll(now=float(i)) for i in range(5)] == [[]] * 5 and not watch.settled
    watch.close()


def test_the_monitor_ends_with_a_clear_line_when_sacct_never_answers(tmp_path, monkeypatch, capsys):
    run_dir = started_run(tmp_path)
    RecordedSlurm(monkeypatch, "")
    assert monitor([run_dir], TABLE, interval_s=0.0, once=False, patience=4) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[-1] == f"monitor: ended; SLURM gave no usable answer about job(s) {JOB}"


# Every state of `man sacct` and `man squeue` (JOB STATE CODES, Slurm 23-25).
DOCUMENTED_STATES = [
    *("BOOT_FAIL", "CANCELLED", "COMPLETED", "CONFIGURING", "COMPLETING", "DEADLINE", "FAILED", "NODE_FAIL"),
    *("OUT_OF_MEMORY", "PENDING", "PREEMPTED", "RUNNING", "RESV_DEL_HOLD", "REQUEUE_FED", "REQUEUE_HOLD"),
    *("REQUEUED", "RESIZING", "REVOKED", "SIGNALING", "SPECIAL_EXIT", "STAGE_OUT", "STOPPED", "SUSPENDED"),
    "TIMEOUT",
]


def test_every_documented_state_has_an_entry():
    assert sorted(set(DOCUMENTED_STATES) - set(JOB_STATE_OUTCOME)) == []
    assert state_outcome("CANCELLED by 1000") == "cancelled" and state_outcome("FROBNICATED") == "unknown"


@pytest.mark.parametrize("state", ["STAGE_OUT", "SIGNALING", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT", "REVOKED"])
def test_a_live_job_in_a_rarer_state_is_not_judged_killed_nor_requeued(tmp_path, monkeypatch, state):
    run_dir = started_run(tmp_path)
    slurm = RecordedSlurm(monkeypatch, f"{state}|0:0|4242\n")
    watch = Monitor(run_dir, TABLE, Slurm())
    lines = watch.poll(now=0.0) + watch.poll(now=1000.0)
    assert slurm.requeues == [] and not any("killed" in line for line in lines), lines
    assert [e["event"] for e in read_events(run_dir)] == ["start"]
    if state == "REVOKED":  # it runs on another cluster of the federation: settled here, without a verdict
        assert lines == [
            f"job {JOB} ({run_dir}) ended REVOKED; {state}: the federation runs it on another cluster, not followed here"
        ]
        assert watch.settled
    else:
        assert lines == [] and not watch.settled
    watch.close()


def test_a_state_the_table_lacks_is_reported_once_and_not_judged(tmp_path, monkeypatch):
    run_dir = started_run(tmp_path)
    slurm = RecordedSlurm(monkeypatch, "FROBNICATED|0:0|4242\n")
    watch = Monitor(run_dir, TABLE, Slurm())
    assert watch.poll(now=0.0) == [
        f"job {JOB} ({run_dir}): state 'FROBNICATED' is not one the monitor knows; not judged"
    ]
    assert watch.poll(now=1000.0) == [] and slurm.requeues == [] and not watch.settled
    slurm.sacct = "NODE_FAIL|0:0|4242\n"  # then it ends, and that end is judged
    assert "ended NODE_FAIL: node_fail" in watch.poll(now=2000.0)[0]
    watch.close()
