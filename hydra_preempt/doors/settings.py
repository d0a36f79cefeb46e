"""How a job is submitted to the preemptible QoS: declared once, checked once.

`preemptible_executor(folder, **settings)` takes these keys; the Hydra
launcher's config (`hydra/launcher=preempt_slurm`) is this dataclass plus the
launcher's own keys. Light on purpose (no torch, no submitit): Hydra imports
it at every start to discover the plugin.
"""

# No `from __future__ import annotations`: OmegaConf reads these annotations as types.
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from ..config import DEFAULT_TIMEOUT_SIGNAL
from ..errors import ConfigError
from ..session.signals import parse_signal

_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
CLUSTERS = (None, "slurm", "local", "debug")


@dataclass
class ExecutorSettings:
    cluster: Optional[str] = None  # "slurm", "local" (the same protocol on this machine), None: slurm if installed
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
    array_parallelism: Optional[int] = None  # jobs of an array running at once
    name: Optional[str] = None  # the job name
    # the time-limit warning: sent signal_lead_s before the limit; must equal the app's signals.timeout
    signal: str = DEFAULT_TIMEOUT_SIGNAL
    signal_lead_s: int = 120
    # escape hatches
    setup: List[str] = field(default_factory=list)  # shell lines run before the job step (module load ..., source venv)
    sbatch_args: Dict[str, Any] = field(default_factory=dict)  # extra #SBATCH --key=value
    srun_args: List[str] = field(default_factory=list)  # extra srun arguments (each one quoted)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: Dict[str, Any]) -> "ExecutorSettings":
        """Settings from keyword values; ConfigError names an unknown key."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ConfigError(
                f"unknown executor setting(s) {', '.join(unknown)}; known: {', '.join(sorted(cls.keys()))}"
            )
        return cls(**values)

    def validate(self) -> str:
        """Raise ConfigError naming the first bad value; return the time-limit signal's name (e.g. 'USR2').

        Every value ends up in an #SBATCH line or an srun argument: names are kept
        to SLURM's character set and no value may carry a line break, so nothing
        can add lines to the job script.
        """
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"cluster must be 'slurm' or 'local', got {self.cluster!r}")
        for key in ("qos", "account", "partition"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, str) and _SLURM_NAME.match(value)):
                raise ConfigError(f"{key} must be a SLURM name (letters, digits, _ . + -), got {value!r}")
        for key, least in (
            ("timeout_min", 1),
            ("nodes", 1),
            ("tasks_per_node", 1),
            ("cpus_per_task", 1),
            ("gpus_per_node", 0),
            ("array_parallelism", 1),
            ("signal_lead_s", 0),
        ):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ConfigError(f"{key} must be an integer >= {least}, got {value!r}")
        mem_gb = self.mem_gb
        if mem_gb is not None and (isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float)) or mem_gb <= 0):
            raise ConfigError(f"mem_gb must be a number > 0, got {mem_gb!r}")
        if self.signal_lead_s >= self.timeout_min * 60:
            raise ConfigError(
                f"signal_lead_s ({self.signal_lead_s}) must be shorter than the time limit ({self.timeout_min} min)"
            )
        name = parse_signal(self.signal, "signal").name.removeprefix("SIG")
        sbatch_args = {} if self.sbatch_args is None else self.sbatch_args
        if not isinstance(sbatch_args, dict):
            raise ConfigError(f"sbatch_args must be a mapping of option: value, got {sbatch_args!r}")
        for key, value in sbatch_args.items():
            if not (isinstance(key, str) and _SBATCH_KEY.match(key)):
                raise ConfigError(f"sbatch_args: {key!r} is not an sbatch option name (like 'constraint' or 'gres')")
            if "\n" in str(value) or "\r" in str(value):
                raise ConfigError(f"sbatch_args.{key} must not contain a line break")
        for key in ("srun_args", "setup"):
            values = [] if getattr(self, key) is None else getattr(self, key)
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
                raise ConfigError(f"{key} must be a list of strings, got {values!r}")
        if any("\n" in a or "\r" in a for a in self.srun_args or []):
            raise ConfigError("srun_args must not contain line breaks")
        return name
