"""How a job is submitted to the preemptible QoS: declared once, checked once.

`preemptible_executor(folder, **settings)` takes these keys; the Hydra
launcher's config (`hydra/launcher=preempt_slurm`) is this dataclass plus the
launcher's own keys. Light on purpose (no torch, no submitit): Hydra imports
it at every start to discover the plugin.
"""

# No `from __future__ import annotations`: OmegaConf reads these annotations as types.
import math
import re
import unicodedata
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from ..config import DEFAULT_TIMEOUT_SIGNAL
from ..errors import ConfigError
from ..session.signals import parse_signal

# Always matched against the whole string (fullmatch): `$` would let a trailing line break through.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_JOB_NAME = re.compile(r"[A-Za-z0-9_.+:@,=-]{1,200}")
_SBATCH_KEY = re.compile(r"[a-z][a-z0-9-]*")
CLUSTERS = (None, "slurm", "local", "debug")

# sbatch options the protocol sets itself, and the setting to use instead (None: not settable).
# sbatch also takes any unambiguous abbreviation of an option (--requ is --requeue), so a key that
# begins one of these is refused too.
PROTOCOL_OPTIONS: Dict[str, Optional[str]] = {
    "qos": "qos",
    "account": "account",
    "partition": "partition",
    "time": "timeout_min",
    "nodes": "nodes",
    "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task",
    "gpus-per-node": "gpus_per_node",
    "mem": "mem_gb",
    "job-name": "name",
    "signal": "signal and signal_lead_s",
    "requeue": None,
    "no-requeue": None,
    "open-mode": None,
    "output": None,
    "error": None,
    "array": "array_parallelism",
    "wrap": None,
}


# srun options the protocol sets for the job step (submitit's logs, appended to across requeues)
_SRUN_PROTOCOL = ("output", "error", "open-mode", "signal")
_SRUN_SHORT = frozenset({"-o", "-e"})


def control_character(text: str, allow_tab: bool = False) -> Optional[str]:
    """The first control character or line/paragraph separator in `text`, as repr, or None."""
    for c in text:
        if c == "\t" and allow_tab:
            continue
        if unicodedata.category(c) in ("Cc", "Zl", "Zp"):
            return repr(c)
    return None


def _no_control(where: str, text: str, allow_tab: bool = False) -> None:
    bad = control_character(text, allow_tab)
    if bad:
        raise ConfigError(f"{where} must not contain a line break or control character (found {bad}): {text!r}")


# sbatch options of their own that begin a protocol option's name (exact names are not abbreviations)
_OWN_OPTIONS = frozenset({"gpus", "ntasks"})


def protocol_option(key: str) -> Optional[str]:
    """The protocol-owned sbatch option that `key` names or abbreviates, if any."""
    if key in _OWN_OPTIONS:
        return None
    return next((option for option in PROTOCOL_OPTIONS if option.startswith(key)), None)


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
            if value is not None and not (isinstance(value, str) and _SLURM_NAME.fullmatch(value)):
                raise ConfigError(f"{key} must be a SLURM name (letters, digits, _ . + -), got {value!r}")
        if self.name is not None and not (isinstance(self.name, str) and _JOB_NAME.fullmatch(self.name)):
            raise ConfigError(f"name must be a job name of letters, digits and _ . + : @ , = -, got {self.name!r}")
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
        if mem_gb is not None and (
            isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float)) or not 0 < mem_gb < math.inf
        ):
            raise ConfigError(f"mem_gb must be a finite number > 0, got {mem_gb!r}")
        if self.signal_lead_s >= self.timeout_min * 60:
            raise ConfigError(
                f"signal_lead_s ({self.signal_lead_s}) must be shorter than the time limit ({self.timeout_min} min)"
            )
        name = parse_signal(self.signal, "signal").name.removeprefix("SIG")
        sbatch_args = {} if self.sbatch_args is None else self.sbatch_args
        if not isinstance(sbatch_args, dict):
            raise ConfigError(f"sbatch_args must be a mapping of option: value, got {sbatch_args!r}")
        for key, value in sbatch_args.items():
            if not (isinstance(key, str) and _SBATCH_KEY.fullmatch(key)):
                raise ConfigError(f"sbatch_args: {key!r} is not an sbatch option name (like 'constraint' or 'gres')")
            owned = protocol_option(key)
            if owned is not None:
                instead = PROTOCOL_OPTIONS[owned]
                raise ConfigError(
                    f"sbatch_args.{key}: --{owned} is set by the preemption protocol"
                    + (f"; use the {instead} setting" if instead else " and cannot be changed")
                )
            text = str(value)
            _no_control(f"sbatch_args.{key}", text)
            if any(c.isspace() for c in text):
                raise ConfigError(f"sbatch_args.{key} must not contain spaces (one option per key), got {text!r}")
        for key in ("srun_args", "setup"):
            values = [] if getattr(self, key) is None else getattr(self, key)
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
                raise ConfigError(f"{key} must be a list of strings, got {values!r}")
            for i, v in enumerate(values):
                _no_control(f"{key}[{i}]", v, allow_tab=key == "setup")
        for arg in self.srun_args or []:
            option = arg.split("=", 1)[0]
            long = option[2:] if option.startswith("--") else None
            if option in _SRUN_SHORT or (long and any(o.startswith(long) for o in _SRUN_PROTOCOL)):
                raise ConfigError(
                    f"srun_args: {arg!r} would change the job step's log files or signals, which the "
                    "preemption protocol sets"
                )
        return name
