"""The launcher's config keys, registered as hydra/launcher=preempt_slurm and hydra/launcher=preempt_local.

Hydra rejects unknown keys and values of the wrong type itself; the launcher
checks the rest (ranges, signal names, shell-safe values) before it submits.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class PreemptLauncherConf:
    _target_: str = "hydra_plugins.hydra_preempt_launcher.launcher.PreemptLauncher"
    cluster: str = "slurm"  # "slurm", or "local": the same protocol on this machine (submitit's local executor)
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    wait: bool = True  # false: submit, write SWEEP_DIR/sweep_manifest.json and return
    check: bool = True  # ask the scheduler (sbatch --test-only) to validate qos/account/partition first
    # where and how big
    qos: Optional[str] = "preemptible"
    account: Optional[str] = None
    partition: Optional[str] = None
    timeout_min: int = 60
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: Optional[int] = None
    gpus_per_node: Optional[int] = None
    mem_gb: Optional[float] = None
    array_parallelism: int = 256  # jobs of the sweep running at once
    name: str = "${hydra.job.name}"
    # stops and requeues
    signal: str = "USR2"  # the time-limit warning; must equal the app's signals.timeout
    signal_lead_s: int = 120  # seconds before the time limit that it is sent
    max_preemptions: int = 50  # per job: beyond this the job fails instead of requeueing
    max_timeouts: int = 10
    # escape hatches
    setup: List[str] = field(default_factory=list)  # shell lines run before the job step (module load ..., source venv)
    sbatch_args: Dict[str, Any] = field(default_factory=dict)  # extra #SBATCH --key=value
    srun_args: List[str] = field(default_factory=list)  # extra srun arguments (each one quoted)


@dataclass
class PreemptLocalLauncherConf(PreemptLauncherConf):
    cluster: str = "local"
    qos: Optional[str] = None


ConfigStore.instance().store(group="hydra/launcher", name="preempt_slurm", node=PreemptLauncherConf(), provider="hydra_preempt")
ConfigStore.instance().store(group="hydra/launcher", name="preempt_local", node=PreemptLocalLauncherConf(), provider="hydra_preempt")
