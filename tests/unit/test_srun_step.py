"""The tasks of an srun step as SLURM describes them (pure: environment mappings), and the config keys."""

import re

import pytest

from hydra_preempt.config import SessionConfig
from hydra_preempt.errors import ConfigError
from hydra_preempt.slurm.env import SlurmTask, SrunStep, first_host

STEP = {
    "SLURM_JOB_ID": "4711",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_NTASKS": "4",
}


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu[07-09,12],cpu1", "gpu07"),
        ("r[1-2]-n[3-4]", "r1-n3"),
        ("node1,node2", "node1"),
        ("hpnode[1-2]", "hpnode1"),
        ("single", "single"),
        ("a[3]", "a3"),
        ("gpu[12,7-9]", "gpu12"),
        ("gpu[07", "gpu"),  # not a list SLURM writes: no exception
    ],
)
def test_the_first_host_of_a_slurm_host_list(nodelist, host):
    assert first_host(nodelist) == host


def test_a_task_of_a_step_of_four():
    step = SrunStep.from_env(STEP)
    assert step == SrunStep("4711", "0", rank=3, world_size=4, local_rank=1, first_host="gpu07")
    assert step.ports(29500) == [29500]
    ports = step.ports(None)
    assert len(set(ports)) == 8 and all(15000 <= p < 25000 for p in ports)
    assert SrunStep("4711", "0", 0, 2, 0, "other-host").ports(None) == ports  # every task, every host: the same


def test_adjacent_steps_do_not_start_on_one_port():
    """Lightning's way (15000 + the job id's last 4 digits + the step id) put job N's step 1 and job
    N+1's step 0 on one port."""
    firsts = {SrunStep(str(job), str(s), 0, 2, 0, "h").ports(None)[0] for job in range(1000, 1100) for s in range(3)}
    assert len(firsts) > 270  # of 300 steps: a hash, nearly all apart


@pytest.mark.parametrize(
    "env",
    [
        {k: v for k, v in STEP.items() if k != "SLURM_STEP_NUM_TASKS"},  # a batch script: no step of several
        {**STEP, "SLURM_STEP_NUM_TASKS": "1"},
        {k: v for k, v in STEP.items() if k != "SLURM_JOB_ID"},
        {},
        {**STEP, "SLURM_STEP_NUM_TASKS": "²"},  # isdigit() but no int()
    ],
)
def test_no_step_of_several_tasks(env):
    assert SrunStep.from_env(env) is None


def test_a_torch_launcher_keeps_its_own_group():
    assert SrunStep.launched_by_torch({"TORCHELASTIC_RUN_ID": "x"})
    assert SrunStep.launched_by_torch({"RANK": "0", "WORLD_SIZE": "2"})
    assert not SrunStep.launched_by_torch(STEP)


def test_the_config_keys():
    config = SessionConfig.from_mapping({"distributed": {"srun": False, "port": 29500}})
    assert config.distributed.srun is False and config.distributed.port == 29500
    with pytest.raises(ConfigError, match=re.escape("distributed.port must be null or 1024..65535, got 80")):
        SessionConfig.from_mapping({"distributed": {"port": 80}})


def test_a_rank_beyond_the_step_is_refused_before_any_rendezvous():
    from hydra_preempt.config import DistributedConfig
    from hydra_preempt.session.srun import srun_process_group

    step = SrunStep("7", "0", rank=5, world_size=2, local_rank=0, first_host="h")
    refused = pytest.raises(ConfigError, match="SLURM_PROCID=5 is no task of an srun step of SLURM_STEP_NUM_TASKS=2")
    with refused, srun_process_group(DistributedConfig(), step):
        pass


def test_a_group_the_training_function_destroyed_itself_is_left_alone(monkeypatch):
    """A DDP script's last line is `dist.destroy_process_group()`: the run's end must not fail on it
    (it raised AssertionError, and a preempted job was never requeued)."""
    import socket

    import torch.distributed as dist

    from hydra_preempt.config import DistributedConfig
    from hydra_preempt.session.srun import srun_process_group

    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    step = SrunStep("7", "0", rank=0, world_size=1, local_rank=0, first_host="127.0.0.1")
    with srun_process_group(DistributedConfig(port=port), step):
        assert dist.is_initialized()
        dist.destroy_process_group()
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "step_id, in_batch_step",
    [(None, True), ("batch", True), ("4294967291", True), ("4294967294", True), ("0", False), ("3", False)],
)
def test_a_task_knows_whether_the_batch_script_started_it(step_id, in_batch_step):
    """SLURM signals job steps, not the batch script: a process the script starts directly (SLURM 22.05
    sets no SLURM_STEP_ID for it) hears a preemption only at the kill."""
    env = {"SLURM_JOB_ID": "4711", **({"SLURM_STEP_ID": step_id} if step_id else {})}
    task = SlurmTask.from_env(env)
    assert task is not None and task.in_batch_step is in_batch_step


def test_the_workers_torchrun_starts_in_one_task_have_their_own_rank():
    """Every worker of task 0 has SLURM_PROCID=0: torchrun's RANK says which one requeues the job (the
    e2e job of 2 Trainer processes lost its stop event to worker 1's requeue)."""
    task = {"SLURM_JOB_ID": "4711", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert SlurmTask.from_env(task).rank == 0
    assert SlurmTask.from_env({**task, "TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2"}).rank == 1
    assert SlurmTask.from_env({**task, "SLURM_PROCID": "1"}).rank == 1  # srun's tasks, no launcher
    left_over = {**task, "SLURM_PROCID": "1", "RANK": "0", "WORLD_SIZE": "1"}  # exported, no torchrun
    assert SlurmTask.from_env(left_over).rank == 1
    assert SlurmTask.from_env({**task, "SLURM_PROCID": "1", "TORCHELASTIC_RUN_ID": "x"}).rank == 1
