"""The launcher's config keys, registered as hydra/launcher=preempt_slurm and hydra/launcher=preempt_local.

The executor keys are hydra_preempt's ExecutorSettings (one declaration,
shared with `preemptible_executor`); the launcher adds its own. Hydra rejects
unknown keys and values of the wrong type itself; the launcher checks the
rest (ranges, signal names, shell-safe values) before it submits.
"""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore

from hydra_preempt.doors.settings import ExecutorSettings


@dataclass
class PreemptLauncherConf(ExecutorSettings):
    _target_: str = "hydra_plugins.hydra_preempt_launcher.launcher.PreemptLauncher"
    cluster: Optional[str] = "slurm"
    array_parallelism: Optional[int] = 256
    name: Optional[str] = "${hydra.job.name}"
    # the launcher's own keys
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    wait: bool = True  # false: submit, write SWEEP_DIR/sweep_manifest.json and return
    max_preemptions: Optional[int] = None  # per job; null: the app's requeue.max_preemptions
    max_timeouts: Optional[int] = None  # per job; null: the app's requeue.max_timeouts


@dataclass
class PreemptLocalLauncherConf(PreemptLauncherConf):
    cluster: Optional[str] = "local"
    qos: Optional[str] = None


ConfigStore.instance().store(
    group="hydra/launcher", name="preempt_slurm", node=PreemptLauncherConf(), provider="hydra_preempt"
)
ConfigStore.instance().store(
    group="hydra/launcher", name="preempt_local", node=PreemptLocalLauncherConf(), provider="hydra_preempt"
)
