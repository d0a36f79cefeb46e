"""Pure parts of the Snakemake grid and of the Hydra sweep manifest and status."""

import json
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra_preempt.doors.hydra_sweep import (
    SweepJob,
    SweepMismatchError,
    check_same_sweep,
    format_table,
    load_manifest,
    run_standing,
    save_manifest,
)
from hydra_preempt.doors.settings import ExecutorSettings
from hydra_preempt.doors.snakemake_grid import load_experiments
from hydra_preempt.errors import ConfigError, HydraPreemptError
from hydra_preempt.rundir import RunLog


def test_grid_builds_overrides_common_first():
    experiments = load_experiments(
        {
            "common_overrides": {"trainer.max_steps": 100, "checkpoint.emergency": False},
            "experiments": [{"name": "a", "overrides": {"optim.lr": 0.01, "checkpoint.metric": None}}, {"name": "b"}],
        }
    )
    assert experiments["a"].overrides == (
        "trainer.max_steps=100",
        "checkpoint.emergency=false",
        "optim.lr=0.01",
        "checkpoint.metric=null",
    )
    assert experiments["b"].overrides == ("trainer.max_steps=100", "checkpoint.emergency=false")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"experiments": [{"name": "a"}], "colour": 1}, "unknown workflow config key(s) colour"),
        ({"experiments": []}, "the grid is empty"),
        ({}, "the grid is empty"),
        ({"experiments": [{"name": "a"}, {"name": "a"}]}, "experiments[1]: duplicate experiment name 'a'"),
        ({"experiments": [{"name": "x/y"}]}, "experiments[0]: name must be"),
        (
            {"experiments": [{"name": "a", "overrides": {"optim.lr": [1, 2]}}]},
            "experiments[0] (a).overrides.optim.lr must be a single value",
        ),
        ({"experiments": [{"name": "a", "overrides": {"a b": 1}}]}, "'a b' is not a Hydra config key"),
        ({"experiments": [{"name": "a", "overrides": {"hydra.run.dir": "x"}}]}, "hydra.run.dir is Hydra's own"),
        ({"experiments": [{"name": "a", "overrides": {"++hydra.run.dir": "x"}}]}, "++hydra.run.dir is Hydra's own"),
        ({"experiments": [{"name": "a", "overrides": {"+hydra.job.chdir": "x"}}]}, "+hydra.job.chdir is Hydra's own"),
        ({"experiments": [{"name": "a", "overrides": {"~hydra": None}}]}, "~hydra is Hydra's own"),
        ({"common_overrides": {"hydra.verbose": True}, "experiments": [{"name": "a"}]}, "hydra.verbose is Hydra's own"),
        ({"experiments": [{"name": "a", "overrides": {" hydra.run.dir": "x"}}]}, "is not a Hydra config key"),
        ({"experiments": [{"name": ".."}]}, "experiments[0]: name must be"),
        ({"experiments": [{"name": ".hidden"}]}, "experiments[0]: name must be"),
        ({"experiments": [{"name": "a\n"}]}, "experiments[0]: name must be"),
        ({"experiments": [{"name": "a", "overrides": {"optim.lr": "a,b"}}]}, "is not a valid Hydra override (a sweep"),
        ({"experiments": [{"name": "a", "overrides": {"optim.lr": "$("}}]}, "is not a valid Hydra override"),
        ({"experiments": [{"name": "a", "overrides": {"optim.lr": " ="}}]}, "is not a valid Hydra override"),
        ({"experiments": [{"name": "a", "overrides": {"optim.lr": "1\x00"}}]}, "must not contain a line break"),
        ({"experiments": ["a"]}, "experiments[0] must be a mapping"),
        ({"runs_dir": "runs/${x}", "experiments": [{"name": "a"}]}, "contains a brace, which Snakemake reads as"),
        ({"runs_dir": "runs/{lr}", "experiments": [{"name": "a"}]}, "contains a brace, which Snakemake reads as"),
        ({"runs_dir": "~/scratch/runs", "experiments": [{"name": "a"}]}, "starts with ~, which neither Snakemake nor"),
        ({"runs_dir": "runs/a\tb", "experiments": [{"name": "a"}]}, "contains"),
        ({"runs_dir": " ", "experiments": [{"name": "a"}]}, "runs_dir must be a non-empty path"),
    ],
)
def test_grid_errors_name_the_entry(config, message):
    with pytest.raises(ConfigError) as e:
        load_experiments(config)
    assert message in str(e.value)


def test_a_manifest_round_trips_and_another_sweep_is_refused(tmp_path):
    jobs = {
        0: SweepJob(0, ["lr=1"], str(tmp_path / "0"), "slurm", "12_0"),
        1: SweepJob(1, ["lr=2"], str(tmp_path / "1"), "slurm", "12_1"),
    }
    save_manifest(tmp_path, jobs)
    assert load_manifest(tmp_path) == jobs
    check_same_sweep(
        tmp_path,
        jobs,
        [SweepJob(1, ["lr=2"], str(tmp_path / "1"), "slurm"), SweepJob(2, ["lr=3"], str(tmp_path / "2"), "slurm")],
    )
    with pytest.raises(SweepMismatchError, match=r"job #1 ran with \[lr=2\]"):
        check_same_sweep(tmp_path, jobs, [SweepJob(1, ["lr=5"], str(tmp_path / "1"), "slurm")])


def test_an_unreadable_manifest_is_reported_not_overwritten(tmp_path):
    (tmp_path / "sweep_manifest.json").write_text("{not json")
    with pytest.raises(HydraPreemptError, match="move it aside"):
        load_manifest(tmp_path)


def test_run_standing_follows_the_run_log(tmp_path):
    assert run_standing(tmp_path).status == "not started"
    RunLog(tmp_path).append("start")
    assert run_standing(tmp_path).status == "running"
    RunLog(tmp_path).append("stop", reason="preempted")
    RunLog(tmp_path).append("await_requeue")
    assert run_standing(tmp_path).status == "preempted"
    RunLog(tmp_path).append("start")
    RunLog(tmp_path).append("stop", reason="finished")
    (tmp_path / "result.json").write_text(json.dumps({"loss": 0.5, "step": 10}))
    standing = run_standing(tmp_path)
    assert (standing.status, standing.starts, standing.preemptions, standing.finished) == ("finished", 2, 1, True)
    assert standing.restart == ""
    RunLog(tmp_path).append("start")
    RunLog(tmp_path).append("stop", reason="failed", failure="nccl", restart_reason="nccl: restart (attempt 1/3)")
    assert run_standing(tmp_path).restart == "nccl: restart (attempt 1/3)"
    rows = [
        {
            "num": 0,
            "job_id": "7",
            "scheduler": "COMPLETED",
            "run": "finished",
            "preemptions": 1,
            "timeouts": 0,
            "checkpoint_step": 10,
            "restart": "nccl: restart (attempt 1/3)",
            "result": standing.result,
            "gpu": {"0": {"peak_memory_mib": 9000.4, "mean_utilization_pct": 51.2, "samples": 3}},
            "overrides": ["lr=1"],
        }
    ]
    table = format_table(rows).splitlines()
    assert table[0].split()[:2] == ["#", "job"] and "loss=0.5 step=10" in table[1] and table[1].endswith("lr=1")
    assert "restart" in table[0] and "nccl: restart (attempt 1/3)" in table[1]
    assert " 0:9000MiB/51% " in table[1]


def test_executor_settings_refuse_script_injection():
    base = dict(
        qos="preemptible",
        account=None,
        partition=None,
        timeout_min=60,
        nodes=1,
        tasks_per_node=1,
        cpus_per_task=None,
        gpus_per_node=None,
        mem_gb=None,
        signal="USR2",
        signal_lead_s=120,
        array_parallelism=None,
        setup=None,
        sbatch_args=None,
        srun_args=None,
        cluster="slurm",
    )
    assert ExecutorSettings(**base).validate() == "USR2"
    for change, message in [
        ({"account": "x\n#SBATCH --qos=normal"}, "account must be a SLURM name"),
        ({"qos": "preemptible\n"}, "qos must be a SLURM name"),  # `$` would have let this through
        ({"name": "job\ntouch /tmp/x #"}, "name must be a job name"),
        ({"name": "job name"}, "name must be a job name"),
        ({"sbatch_args": {"comment": "a\nrm -rf /"}}, "must not contain a line break"),
        ({"sbatch_args": {"comment": "a --signal=B:KILL@1"}}, "must not contain spaces"),
        ({"sbatch_args": {"constraint\n": "a100"}}, "is not an sbatch option name"),
        ({"sbatch_args": {"--qos": "normal"}}, "is not an sbatch option name"),
        ({"sbatch_args": {"qos": "normal"}}, "--qos is set by the preemption protocol; use the qos setting"),
        ({"sbatch_args": {"signal": "B:USR1@60"}}, "use the signal and signal_lead_s setting"),
        ({"sbatch_args": {"requ": "x"}}, "--requeue is set by the preemption protocol and cannot be changed"),
        ({"sbatch_args": {"open-mode": "truncate"}}, "--open-mode is set by the preemption protocol"),
        ({"sbatch_args": {"no-requeue": True}}, "--no-requeue is set by the preemption protocol"),
        ({"srun_args": ["--x\n"]}, "srun_args[0] must not contain a line break"),
        ({"setup": ["module load cuda", "echo\x1b[2J"]}, "setup[1] must not contain"),
        ({"srun_args": ["--open-mode=truncate"]}, "would change the job step's log files or signals"),
        ({"srun_args": ["--out", "x.log"]}, "would change the job step's log files or signals"),
        ({"srun_args": ["-e", "x.log"]}, "would change the job step's log files or signals"),
        ({"srun_args": "--exclusive"}, "srun_args must be a list of strings"),
        ({"tasks_per_node": True}, "tasks_per_node must be an integer >= 1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            ExecutorSettings(**{**base, **change}).validate()
    ok = {
        "sbatch_args": {"constraint": "a100", "gres": "gpu:1", "gpus": 2, "ntasks": 2},
        "name": "lr-0.1_seed=1",
        "srun_args": ["--cpu-bind", "cores", "--exclusive"],
    }
    assert ExecutorSettings(**{**base, **ok}).validate() == "USR2"


_CONTROL = st.sampled_from([chr(c) for c in [*range(0, 32), 127]] + ["\x85", "\u2028", "\u2029"])


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(["qos", "account", "partition", "name", "sbatch", "srun", "setup"]),
    before=st.text(alphabet="abcXYZ019_-", max_size=8),
    control=_CONTROL,
    after=st.text(max_size=8),
)
def test_no_control_character_reaches_a_job_script_from_any_setting(field, before, control, after):
    value = before + control + after
    if (
        field == "setup"
        and control == "\t"
        and not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") and c != "\t" for c in after)
    ):
        return  # a tab in a setup line is a shell blank, not a new line
    change = {
        "sbatch": {"sbatch_args": {"constraint": value}},
        "srun": {"srun_args": [value]},
        "setup": {"setup": [value]},
    }.get(field, {field: value})
    with pytest.raises(ConfigError):
        ExecutorSettings(cluster="slurm", **change).validate()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused_in_session_and_executor_settings(value):
    from hydra_preempt import SessionConfig

    for mapping, key in (
        ({"checkpoint": {"every_seconds": value}}, "checkpoint.every_seconds must be a finite number"),
        ({"divergence": {"factor": value}}, "divergence.factor must be a finite number"),
    ):
        with pytest.raises(ConfigError, match=re.escape(key)):
            SessionConfig.from_mapping(mapping)
    with pytest.raises(ConfigError, match="mem_gb must be a finite number > 0"):
        ExecutorSettings(cluster="slurm", mem_gb=value).validate()


def test_status_of_run_directories_names_each_and_calls_a_start_without_a_stop_in_an_ended_job_killed(
    tmp_path, monkeypatch, capsys
):
    from hydra_preempt import cli
    from hydra_preempt.doors import hydra_sweep
    from hydra_preempt.rundir import JobIdentity

    local, killed = tmp_path / "local", tmp_path / "killed"
    for run_dir in (local, killed):
        run_dir.mkdir()
    RunLog(local).append("start")
    RunLog(local).append("stop", reason="finished")
    RunLog(killed, JobIdentity("516", 0)).append("start")
    monkeypatch.setattr(hydra_sweep, "scheduler_state", lambda job: {"516": "FAILED"}[job.job_id])
    assert cli.main(["status", str(local), str(killed), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["num"], r["job_id"], r["scheduler"], r["run"]) for r in rows] == [
        ("local", None, "-", "finished"),
        ("killed", "516", "FAILED", "killed"),
    ]
    assert cli.main(["status", str(tmp_path)]) == 2
    assert "is neither a sweep (no sweep_manifest.json" in capsys.readouterr().err


class _Resources(dict):
    __getattr__ = dict.__getitem__


class _Job:
    """What snakemake-executor-plugin-slurm reads of a job to build its sbatch line."""

    def __init__(self, resources):
        self.resources, self.threads = _Resources(resources), resources["cpus_per_task"]


@pytest.mark.parametrize(
    "nodes, tasks_per_node, gpus, asked, never",
    [
        (1, 1, 0, ["--ntasks=1"], ["--nodes", "gpu"]),
        (1, 1, 2, ["--gpus=2"], ["--nodes", "--ntasks-per-gpu"]),
        (2, 1, 0, ["--nodes=2", "--ntasks=2"], ["gpu"]),
        (2, 4, 4, ["--nodes=2", "--ntasks=8", "--gpus-per-node=4"], ["--gpus=", "--ntasks-per-gpu"]),
        (2, 1, 1, ["--nodes=2", "--ntasks=2", "--gpus-per-node=1"], ["--gpus=", "--ntasks-per-gpu"]),
    ],
)
def test_the_train_rules_resources_ask_slurm_for_what_the_grid_means(nodes, tasks_per_node, gpus, asked, never):
    """Through the installed executor plugin's own sbatch line: GPUs per node, every task on its node."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    from hydra_preempt.doors.snakemake_grid import train_command, train_resources, workflow_defaults

    config = {**workflow_defaults(), "nodes": nodes, "tasks_per_node": tasks_per_node, "gpus": gpus}
    job = _Job(train_resources(config))
    params = {
        "run_uuid": "u",
        "slurm_logfile": "log",
        "comment_str": "c",
        "account": "",
        "partition": "",
        "workdir": "",
    }
    line = get_submit_command(job, params) + set_gres_string(job)
    assert all(a in line for a in asked) and not any(n in line for n in never), line
    assert train_command(config) == ("exec srun " if nodes * tasks_per_node > 1 else "exec ")


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40))
def test_every_runs_dir_the_grid_takes_reaches_hydra_unchanged(path):
    """runs/étude, runs/exp#1, runs/a;b, quotes, backslashes: what the grid check passes, Hydra's own
    override parser reads back from hydra.run.dir='...' as exactly that path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_preempt.doors.snakemake_grid import hydra_quoted

    try:
        load_experiments({"runs_dir": path, "experiments": [{"name": "a"}]})
    except ConfigError:
        assert "{" in path or "}" in path or path.startswith("~") or not path.strip()
        return
    override = OverridesParser.create().parse_override(f"hydra.run.dir={hydra_quoted(path + '/a')}")
    assert override.value() == path + "/a"
