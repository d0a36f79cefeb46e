"""The stop classification and requeue decision (pure), and SLURM output parsing."""

import datetime as dt

import pytest

from hydra_preempt.errors import ConfigError
from hydra_preempt.slurm.commands import (
    ClusterFacts,
    JobInfo,
    SlurmError,
    parse_cluster_facts,
    parse_duration,
    parse_key_values,
    parse_time,
    state_outcome,
)
from hydra_preempt.slurm.stop import (
    RequeueBudget,
    Requeuer,
    StopKind,
    budget_exhausted,
    classify_stop,
    decide,
    slurm_requeues_preempted,
)

NOW = dt.datetime(2026, 11, 24, 12, 0, 0)
FAR = NOW + dt.timedelta(hours=1)
NEAR = NOW + dt.timedelta(seconds=60)


@pytest.mark.parametrize(
    "signal, state, preempt_time, limit_end, kind",
    [
        ("SIGTERM", "RUNNING", NOW, FAR, StopKind.PREEMPTED),  # grace-period SIGTERM
        ("SIGUSR2", "RUNNING", NOW, FAR, StopKind.PREEMPTED),  # preempt_send_user_signal
        ("SIGUSR2", "RUNNING", None, NEAR, StopKind.TIMEOUT),  # --signal=USR2@lead
        ("SIGUSR2", "RUNNING", None, FAR, StopKind.TIMEOUT),  # the timeout signal means "requeue"
        ("SIGTERM", "RUNNING", None, NEAR, StopKind.TIMEOUT),  # the time-limit kill itself
        ("SIGTERM", "COMPLETING", None, FAR, StopKind.CANCELLED),  # scancel (measured: COMPLETING)
        ("SIGTERM", "COMPLETING", None, None, StopKind.CANCELLED),  # scancel, no time limit
        ("SIGTERM", "CANCELLED", NOW, FAR, StopKind.CANCELLED),  # cancelled during a grace period
        ("SIGINT", "RUNNING", None, FAR, StopKind.CANCELLED),
    ],
)
def test_classify_stop(signal, state, preempt_time, limit_end, kind):
    assert classify_stop(signal, state, preempt_time, limit_end, NOW) is kind


def test_classify_stop_with_hup_as_preempt_signal():
    assert classify_stop("SIGHUP", "RUNNING", None, FAR, NOW, preempt_signal="SIGHUP") is StopKind.PREEMPTED


def test_decide():
    budget = RequeueBudget(max_preemptions=2, max_timeouts=1)
    assert decide(StopKind.CANCELLED, 0, budget, True).requeue_by is Requeuer.NONE
    assert decide(StopKind.PREEMPTED, 0, budget, True).requeue_by is Requeuer.SLURM
    assert decide(StopKind.PREEMPTED, 0, budget, False).requeue_by is Requeuer.SELF
    assert decide(StopKind.TIMEOUT, 1, budget, True).requeue_by is Requeuer.SELF  # SLURM never requeues a timeout
    spent = decide(StopKind.TIMEOUT, 2, budget, False)
    assert spent.requeue_by is Requeuer.NONE and "max_timeouts=1" in spent.fail_reason


def test_budget():
    budget = RequeueBudget(max_preemptions=2, max_timeouts=0)
    assert budget_exhausted(budget, 2, 0) is None
    assert "preemption budget exhausted" in budget_exhausted(budget, 3, 0)
    assert "time-limit budget exhausted" in budget_exhausted(budget, 0, 1)
    with pytest.raises(ConfigError):
        RequeueBudget(max_preemptions=-1)


@pytest.mark.parametrize(
    "mode, requeueable, expected",
    [
        ("REQUEUE", True, True),
        ("REQUEUE", False, False),
        ("CANCEL", True, False),
        ("SUSPEND,GANG", True, False),
        ("GANG,REQUEUE", True, True),
    ],
)
def test_slurm_requeues_preempted(mode, requeueable, expected):
    assert slurm_requeues_preempted(mode, requeueable) is expected


SCONTROL = (
    "JobId=42 JobName=submitit UserId=root(0) GroupId=root(0) Priority=1 QOS=preemptible JobState=RUNNING "
    "Reason=None Requeue=1 Restarts=2 BatchFlag=1 RunTime=00:00:03 TimeLimit=00:02:00 "
    "SubmitTime=2026-11-24T05:48:52 StartTime=2026-11-24T05:48:53 EndTime=2026-11-24T05:50:53 "
    "PreemptTime=None Command=/tmp/with space/job.sh WorkDir=/work/main Comment=a b=c"
)


def test_parse_scontrol_job_line():
    info = JobInfo.from_fields(parse_key_values(SCONTROL))
    assert (info.job_id, info.state, info.qos, info.restarts, info.requeue) == ("42", "RUNNING", "preemptible", 2, True)
    assert info.preempt_time is None and info.time_limit_s == 120
    assert info.limit_end == dt.datetime(2026, 11, 24, 5, 50, 53)
    assert info.fields["Command"] == "/tmp/with space/job.sh"
    assert info.fields["UserId"] == "root(0)"


@pytest.mark.parametrize(
    "text, seconds",
    [("00:00:30", 30), ("1-02:00:00", 93600), ("05:30", 330), ("10", 600), ("UNLIMITED", None), ("", None)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_parse_time():
    assert parse_time("2026-11-24T05:32:19") == dt.datetime(2026, 11, 24, 5, 32, 19)
    assert parse_time("None") is None and parse_time("Unknown") is None and parse_time("garbage") is None


@pytest.mark.parametrize(
    "state, outcome",
    [
        ("CANCELLED by 0", "cancelled"),
        ("PREEMPTED", "preempted"),
        ("REQUEUED", "waiting"),
        ("COMPLETED", "finished"),
        ("TIMEOUT", "failed"),
        ("WEIRD", "unknown"),
    ],
)
def test_state_table(state, outcome):
    assert state_outcome(state) == outcome


CONFIG = """Configuration data as of 2026-11-24T06:50:00
AccountingStorageBackupHost = (null)
JobCompParams           =
KillWait                = 10 sec
PreemptMode             = CANCEL
PreemptType             = preempt/qos
"""


@pytest.mark.parametrize(
    "qos_fields, expected",
    [
        ("00:00:30|cluster\n", ClusterFacts(10.0, 30.0, "CANCEL")),  # the QoS defers to the cluster
        ("00:05:00|REQUEUE\n", ClusterFacts(10.0, 300.0, "REQUEUE")),  # the QoS's own mode wins
        ("", ClusterFacts(10.0, 0.0, "CANCEL")),  # no QoS
    ],
)
def test_parse_cluster_facts(qos_fields, expected):
    # an empty value (JobCompParams) must not swallow the next line
    assert parse_cluster_facts(CONFIG, qos_fields) == expected


def test_requeued_by_slurm_is_a_restart_count_that_rose_without_a_preemption():
    from hydra_preempt.slurm.stop import requeued_by_slurm

    assert requeued_by_slurm(0, 1, None)  # measured: a node set DOWN under the job
    assert not requeued_by_slurm(1, 1, None)  # scancel: COMPLETING, the count unchanged
    assert not requeued_by_slurm(0, 1, NOW)  # a preemption is one, whatever the count


def requeued_under_us(monkeypatch, recorded, restart=True):
    """A SIGTERM at which scontrol shows Restarts 0 -> 1 and no PreemptTime; sacct's record of the run
    then reads `recorded` (a list of answers, one per ask; an exception: it cannot be asked)."""
    from hydra_preempt.outcome import ExitCode, Outcome, Status
    from hydra_preempt.slurm import policy as policy_module
    from hydra_preempt.slurm.env import SlurmTask
    from hydra_preempt.slurm.failures import RestartDecision
    from hydra_preempt.slurm.policy import SlurmStopPolicy

    job = JobInfo.from_fields({"JobId": "7", "JobState": "COMPLETING", "Restarts": "1", "PreemptTime": "None",
                               "Requeue": "1", "NodeList": "hpnode1"})  # fmt: skip
    monkeypatch.setattr(policy_module, "show_job", lambda job_id: job)
    answers = iter(recorded)

    def sacct(job_id):
        answer = next(answers, recorded[-1])  # the last answer again and again
        if isinstance(answer, Exception):
            raise answer
        return [(state, "0:0") for state in answer]

    monkeypatch.setattr(policy_module, "sacct_states", sacct)
    monkeypatch.setattr(policy_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(policy_module, "RECORD_WAIT_S", 0.5)
    reason = "node_fail: restart (attempt 1/3)" if restart else "node_fail: retry budget exhausted (attempt 4/3)"
    policy = SlurmStopPolicy(
        SlurmTask("7", 0, 2, 0), ClusterFacts(), 0, {}, RequeueBudget(), "SIGTERM", "SIGUSR2",
        lambda name: RestartDecision(restart, reason), True,
    )  # fmt: skip
    stopped = Outcome(
        Status.PREEMPTED, 118, ExitCode.REQUEUE, "SIGTERM received: state saved at step 118", signal="SIGTERM"
    )
    return policy.classify(stopped), reason


@pytest.mark.parametrize("restart", [True, False])
@pytest.mark.parametrize(
    "recorded, evidence",
    [
        ([["RUNNING"], ["NODE_FAIL", "PENDING"]], "(sacct: NODE_FAIL)"),  # measured: recorded ~0.2 s after
        ([SlurmError("sacct: command not found")], "(a node of it failed)"),
        ([["RUNNING"]], "(a node of it failed)"),  # never recorded in time
    ],
)
def test_a_node_failure_is_node_fail_and_slurm_has_requeued(monkeypatch, restart, recorded, evidence):
    """sacct records the run NODE_FAIL; a record that cannot be read in time is read as a node failure
    too (the budgeted reading)."""
    from hydra_preempt.outcome import ExitCode, Status

    outcome, reason = requeued_under_us(monkeypatch, recorded, restart)
    assert (outcome.status, outcome.failure, outcome.requeue_by) == (Status.FAILED, "node_fail", Requeuer.DONE.value)
    assert outcome.exit_code == (ExitCode.REQUEUE if restart else ExitCode.FAILED)
    assert outcome.restart_reason == reason and "Restarts 0 -> 1" in outcome.evidence
    assert outcome.evidence.endswith(f"SLURM requeued the job {evidence}")


def test_a_requeue_on_request_is_a_preemption_not_a_node_failure(monkeypatch):
    """`scontrol requeue` by an administrator (measured: COMPLETING, Restarts 0 -> 1, no PreemptTime, as a
    node failure; sacct records the run REQUEUED): the state is saved, SLURM runs the job again; no
    node_fail restart is spent."""
    from hydra_preempt.outcome import ExitCode, Status

    outcome, _ = requeued_under_us(monkeypatch, [["COMPLETING"], ["REQUEUED", "PENDING"]])
    assert (outcome.status, outcome.exit_code, outcome.failure) == (Status.PREEMPTED, ExitCode.REQUEUE, None)
    assert outcome.requeue_by == Requeuer.DONE.value  # nobody requeues it again
    assert "requeued the job on request (sacct: REQUEUED" in outcome.message


@pytest.mark.parametrize("known, status", [(True, "FAILED"), (False, "TIMEOUT")])
def test_a_higher_restart_count_means_a_node_failure_only_if_the_start_read_it(monkeypatch, known, status):
    """A time-limit warning in a job whose start could not ask scontrol (restart count unknown, taken as 0
    from a step without SLURM_RESTART_COUNT): Restarts=2 at the stop is no evidence of a node failure."""
    from hydra_preempt.outcome import ExitCode, Outcome, Status
    from hydra_preempt.slurm import policy as policy_module
    from hydra_preempt.slurm.env import SlurmTask
    from hydra_preempt.slurm.policy import SlurmStopPolicy

    start = (NOW - dt.timedelta(seconds=570)).strftime("%Y-%m-%dT%H:%M:%S")
    job = JobInfo.from_fields({"JobId": "7", "JobState": "RUNNING", "Restarts": "2", "StartTime": start,
                               "TimeLimit": "00:10:00", "PreemptTime": "None", "Requeue": "1"})  # fmt: skip
    monkeypatch.setattr(policy_module, "show_job", lambda job_id: job)
    monkeypatch.setattr(policy_module, "sacct_states", lambda job_id: [("NODE_FAIL", "0:0"), ("RUNNING", "0:0")])
    monkeypatch.setattr(
        policy_module.dt, "datetime", type("Frozen", (dt.datetime,), {"now": staticmethod(lambda: NOW)})
    )
    policy = SlurmStopPolicy(
        SlurmTask("7", 0, 1, 0), ClusterFacts(), 0, {}, RequeueBudget(), "SIGTERM", "SIGUSR2", None, known
    )
    stopped = Outcome(Status.PREEMPTED, 120, ExitCode.REQUEUE, "SIGUSR2 received", signal="SIGUSR2")
    outcome = policy.classify(stopped)
    assert outcome.status is Status[status]
    if not known:
        assert outcome.requeue_by == Requeuer.SELF.value and outcome.failure is None
    else:
        assert outcome.failure == "node_fail" and "at the SIGUSR2" in outcome.evidence


def test_an_accounting_database_that_does_not_answer_leaves_the_kill_unknown_not_due(monkeypatch):
    """sacctmgr failing at the start: KillWait and PreemptMode from scontrol stand, GraceTime is unknown,
    so a preemption's kill is unknown (the watchdog then allows signals.grace_s), never at the signal."""
    from hydra_preempt.slurm import commands
    from hydra_preempt.slurm import policy as policy_module
    from hydra_preempt.slurm.commands import SlurmError
    from hydra_preempt.slurm.env import SlurmTask
    from hydra_preempt.slurm.policy import SlurmStopPolicy

    def answer(args, timeout=30):
        if args[0] == "sacctmgr":
            raise SlurmError("sacctmgr: error: slurmdbd: Connection refused")
        return "KillWait = 30 sec\nPreemptMode = REQUEUE\n"

    monkeypatch.setattr(commands, "slurm_command", answer)
    facts = commands.cluster_facts("preemptible")
    assert (facts.kill_wait_s, facts.grace_s, facts.preempt_mode) == (30.0, None, "REQUEUE")
    job = JobInfo.from_fields({"JobId": "7", "JobState": "RUNNING", "PreemptTime": NOW.strftime("%Y-%m-%dT%H:%M:%S")})
    monkeypatch.setattr(policy_module, "show_job", lambda job_id: job)
    policy = SlurmStopPolicy(SlurmTask("7", 0, 1, 0), facts, 0, {}, RequeueBudget(), "SIGTERM", "SIGUSR2")
    assert policy.seconds_left() is None


@pytest.mark.parametrize("refused", [False, True])
def test_a_requeue_is_in_the_run_log_before_it_is_asked_for(monkeypatch, tmp_path, refused):
    """The requeue ends the job's process, at once when srun forces the step's end: its event must be
    written before `scontrol requeue` runs (a CI run lost it); a refusal is recorded as well."""
    from hydra_preempt.rundir import RunLog, read_events
    from hydra_preempt.slurm import commands, policy

    seen_at_requeue = []

    def scontrol(args, timeout=None):
        seen_at_requeue.append([e["event"] for e in read_events(tmp_path)])
        if refused:
            raise SlurmError("scontrol: error: Invalid job id specified")
        return ""

    monkeypatch.setattr(commands, "slurm_command", scontrol)
    if refused:
        with pytest.raises(SlurmError):
            policy.requeue_recorded("42", RunLog(tmp_path), step=7)
    else:
        policy.requeue_recorded("42", RunLog(tmp_path), step=7)
    assert seen_at_requeue == [["requeue"]]
    events = [(e["event"], e["step"]) for e in read_events(tmp_path)]
    assert events == ([("requeue", 7), ("requeue_failed", 7)] if refused else [("requeue", 7)])
