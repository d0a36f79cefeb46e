"""Configuration of a training session, as dataclasses (also usable as Hydra structured configs).

Plain values and their validation only: the lowest layer, importing nothing of the package but its
errors. Each owner builds its own object from its section (the checkpoint store its retention policy,
the session its detector, signal requests and watchdog, run() the failure table).
`SessionConfig.from_mapping` builds one from a plain or OmegaConf mapping and
rejects unknown keys, wrong types and values out of range with the key's full name.
`check_app_config` checks an app's whole config the same way: its own
sections by a table of rules, the session's sections, no other section.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from .errors import ConfigError

# The time-limit warning: the app's signals.timeout and the executors' `signal` default to it.
DEFAULT_TIMEOUT_SIGNAL = "USR2"
# The signals that can mean "stop for requeue" (SIGUSR1 means "checkpoint and continue", SIGINT "cancel").
PREEMPT_SIGNALS = ("TERM", "USR2", "HUP")


def check_signal_name(name: Any, key: str) -> str:
    """'TERM', 'SIGTERM', 'usr2' -> 'TERM', 'USR2'; ConfigError naming `key` for any other signal."""
    short = str(name).upper().removeprefix("SIG")
    if short not in PREEMPT_SIGNALS:
        raise ConfigError(
            f"{key} must be one of {', '.join(PREEMPT_SIGNALS)} (SIGUSR1 means 'checkpoint and continue', "
            f"SIGINT means 'cancel'), got {name!r}"
        )
    return short


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"  # where checkpoints go: relative to the run directory, or absolute
    every_steps: Optional[int] = None  # periodic save every N steps
    every_seconds: Optional[float] = None  # and/or every T seconds of wall clock
    keep_last: int = 3  # keep the K newest checkpoints (>= 1)
    keep_best: int = 0  # and the N best by `metric`
    metric: Optional[str] = None  # reported metric that ranks the best checkpoints
    mode: str = "min"  # "min" or "max"
    emergency: bool = True  # save on an unhandled exception when the state is consistent
    async_save: bool = True  # periodic saves written in the background (stop saves are always waited for)
    # background saves: parameters and optimizer state copied while the next step computes, before its update
    copy_while_training: bool = True
    cast_dtype: bool = False  # load a model's tensors saved in another dtype, cast to this run's (not an exact resume)

    def validate(self) -> None:
        if not self.dir.strip():
            raise ConfigError("checkpoint.dir must be a directory path, got ''")
        for key in ("every_steps", "every_seconds"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"checkpoint.{key} must be > 0 or null, got {value!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(
                f"checkpoint.keep_last must be an integer >= 1 (the newest checkpoint is always kept), got {self.keep_last!r}"
            )
        if not isinstance(self.keep_best, int) or self.keep_best < 0:
            raise ConfigError(f"checkpoint.keep_best must be an integer >= 0, got {self.keep_best!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"checkpoint.mode must be 'min' or 'max', got {self.mode!r}")
        if self.keep_best and not self.metric:
            raise ConfigError(
                "checkpoint.keep_best > 0 needs checkpoint.metric: the name of a reported metric to rank by"
            )


@dataclass
class DivergenceConfig:
    enabled: bool = True  # the loss-spike detector: a diverging run stops before good checkpoints are lost
    metric: str = "loss"  # the reported metric it watches
    window: int = 50  # baseline: the median of the last N non-spike values
    factor: float = 2.0  # a spike exceeds the baseline by more than (factor - 1) x abs(baseline)
    patience: int = 5  # spikes in a row that mean "diverged"
    min_history: int = 3  # values seen before anything is judged

    def validate(self) -> None:
        if self.window < 1 or self.patience < 1 or self.min_history < 1:
            raise ConfigError("divergence.window, divergence.patience and divergence.min_history must be >= 1")
        if not self.factor > 1.0:
            raise ConfigError(f"divergence.factor must be > 1, got {self.factor!r}")


@dataclass
class SignalConfig:
    preempt: str = "TERM"  # TERM, USR2 or HUP: the scheduler's preemption warning
    timeout: str = DEFAULT_TIMEOUT_SIGNAL  # the signal sent before the time limit (--signal=USR2@lead)
    # seconds from a stop signal to the kill where SLURM does not tell (outside SLURM: torchrun and
    # SLURM's KillWait give 30): a run that has not stopped by then ends with nothing saved, exit 75
    grace_s: float = 25.0

    def validate(self) -> None:
        check_signal_name(self.preempt, "signals.preempt")
        check_signal_name(self.timeout, "signals.timeout")
        if not 0 < self.grace_s < math.inf:
            raise ConfigError(f"signals.grace_s must be a positive number of seconds, got {self.grace_s!r}")


@dataclass
class DistributedConfig:
    sync_every: int = 1  # steps between the ranks' agreement on stop/save (one tiny all-reduce)
    srun: bool = True  # the tasks of an srun step form a process group (false: one process per run directory)
    port: Optional[int] = None  # that group's rendezvous port; null: 8 ports of 15000-24999 from the job and step id
    rendezvous_s: float = 300.0  # how long the tasks of an srun step wait for each other before giving up


@dataclass
class WatchdogConfig:
    enabled: bool = True  # the hang watchdog: a step that makes no progress ends the process (exit 76)
    timeout_s: Optional[float] = None  # a step longer than this is a hang; null: derived from step times
    min_timeout_s: float = 600.0  # the derived timeout: max(10 x the slowest recent step, this)
    startup_s: float = 1800.0  # allowed for start-up and restore (until the first step ends) and for a save

    def validate(self) -> None:
        for key in ("timeout_s", "min_timeout_s", "startup_s"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(
                    f"watchdog.{key} must be > 0{' or null' if key == 'timeout_s' else ''}, got {value!r}"
                )


@dataclass
class FailuresConfig:
    # a YAML file that replaces the shipped failure table (hydra_preempt/slurm/failures.yaml); read and
    # checked by run() before anything runs
    table: Optional[str] = None


@dataclass
class ProgressConfig:
    every_s: float = 30.0  # seconds between progress lines in logs (a terminal gets a live bar instead)
    console: bool = True  # a program without logging set up shows progress and events on stderr (run())


@dataclass
class GpuMetricsConfig:
    enabled: bool = True  # sample every visible GPU through NVML into RUN_DIR/gpu_metrics.jsonl (if NVML answers)
    every_s: float = 10.0  # seconds between samples


@dataclass(frozen=True)
class RequeueBudget:
    max_preemptions: int = 50  # a run preempted more often fails instead of requeueing (checked when it starts again)
    max_timeouts: int = 10  # likewise for reaching the job's time limit

    def __post_init__(self) -> None:
        for name in ("max_preemptions", "max_timeouts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"requeue.{name} must be an integer >= 0, got {value!r}")


@dataclass
class SessionConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    signals: SignalConfig = field(default_factory=SignalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    requeue: RequeueBudget = field(default_factory=RequeueBudget)  # max_preemptions, max_timeouts
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    failures: FailuresConfig = field(default_factory=FailuresConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    gpu_metrics: GpuMetricsConfig = field(default_factory=GpuMetricsConfig)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> SessionConfig:
        config = _build(cls, mapping or {}, "")
        config.validate()
        return config

    def validate(self) -> None:
        if self.progress.every_s <= 0:
            raise ConfigError(f"progress.every_s must be > 0, got {self.progress.every_s!r}")
        if self.gpu_metrics.every_s <= 0:
            raise ConfigError(f"gpu_metrics.every_s must be > 0, got {self.gpu_metrics.every_s!r}")
        if self.distributed.sync_every < 1:
            raise ConfigError(f"distributed.sync_every must be >= 1, got {self.distributed.sync_every!r}")
        if self.distributed.port is not None and not 1024 <= self.distributed.port <= 65535:
            raise ConfigError(f"distributed.port must be null or 1024..65535, got {self.distributed.port!r}")
        if not 0 < self.distributed.rendezvous_s < math.inf:
            raise ConfigError(
                f"distributed.rendezvous_s must be a finite number > 0, got {self.distributed.rendezvous_s!r}"
            )
        self.checkpoint.validate()
        self.divergence.validate()
        self.signals.validate()
        self.watchdog.validate()


def _build(cls: type, mapping: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _refuse_unknown(mapping, names, prefix)
    values = {}
    for name, value in mapping.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, hint, prefix + name)
    return cls(**values)


def _refuse_unknown(given: Any, known: set[str], prefix: str, what: str = "key") -> None:
    unknown = sorted(str(k) for k in set(given) - known)  # a YAML key may be a number or a bool
    if unknown:
        raise ConfigError(
            f"unknown {what}(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(known))}"
        )


@dataclass(frozen=True)
class Rule:
    """What one key of an app's own section must be: a type, checked as the session's keys are
    (no bool for a number, floats finite), and a range; `says` is the message's "must be ..."."""

    type: type  # int, float, bool or str
    says: str  # "a positive integer"
    test: Callable[[Any], bool] = lambda value: True

    def check(self, value: Any, key: str) -> None:
        try:
            ok = self.test(_check_type(value, self.type, key))
        except ConfigError:
            ok = False
        if not ok:
            raise ConfigError(f"{key} must be {self.says}, got {value!r}")


def check_app_config(config: Mapping[str, Any], rules: Mapping[str, Rule]) -> SessionConfig:
    """Check an app's whole (resolved) config before anything runs; return its session part.

    `rules` maps every key of the app's own sections ('trainer.max_steps') to its Rule; a key
    missing or not in the table is refused. The session's sections (checkpoint, divergence, ...)
    are checked by SessionConfig. Any other top-level key is refused: a section added with a typo
    (`+chekpoint.every_steps=5`) would otherwise be silently ignored.
    """
    own = {key.split(".")[0] for key in rules}
    session = {f.name for f in dataclasses.fields(SessionConfig)}
    # "hydra": Hydra's own section, absent from the config a task function gets; present in a composed one
    _refuse_unknown(config, own | session | {"hydra"}, "", "section")
    for section in sorted(own):
        values = config.get(section)
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section} must be a mapping, got {values!r}")
        _refuse_unknown(values, {key.split(".", 1)[1] for key in rules if key.startswith(section + ".")}, section + ".")
    for key, rule in rules.items():
        section, name = key.split(".", 1)
        if name not in config[section]:
            raise ConfigError(f"{key} is missing")
        rule.check(config[section][name], key)
    return SessionConfig.from_mapping({name: config[name] for name in session if name in config})


def _check_type(value: Any, hint: Any, key: str) -> Any:
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None and optional:
        return None
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[base]
    if not ok:
        raise ConfigError(f"{key} must be {'null or ' if optional else ''}{base.__name__}, got {value!r}")
    if base is float and not math.isfinite(value):  # nan compares false with every bound: never let one in
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value) if base is float else value
