"""Your own Hydra app, preemption-safe: `run_hydra_app(train, cfg)` inside `@hydra.main`.

    @hydra.main(version_base="1.3", config_path="conf", config_name="config")
    def main(cfg):
        return run_hydra_app(train, cfg)          # train(session, cfg)

What train.py's main does, for any app: the session's sections of the app's
config (checkpoint, divergence, signals, ...: see README "Configuration") are
checked, and a bad value, an unknown key in them or an interpolation that does
not resolve ends the program with one line and exit code 2 before anything
runs; with `rules` (config.Rule per key of the app's own sections), the whole
config is checked that way and an unknown top-level section is refused too.
The run's directory is Hydra's output directory. A plain run (`python app.py`,
under `srun` too) ends the process with the outcome's exit code, requeueing
the SLURM job when that is its part (`exit_with`); in a sweep (`-m`) the
outcome is returned for the launcher to conclude.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable, Mapping

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import Rule, SessionConfig, check_app_config
from ..errors import ConfigError
from ..outcome import ExitCode, Outcome
from ..session.api import Session
from ..session.runner import JobContext, run
from ..slurm.policy import exit_with

log = logging.getLogger("hydra_preempt")


def session_config(cfg: DictConfig, rules: Mapping[str, Rule] | None = None) -> SessionConfig:
    """The SessionConfig of an app's config node; ConfigError (one line) for anything wrong in it."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve, a missing value
        raise ConfigError(str(e).splitlines()[0]) from None
    if not isinstance(values, dict):
        raise ConfigError(f"the app's config must be a mapping, got {type(values).__name__}")
    if rules is not None:
        return check_app_config(values, rules)  # type: ignore[arg-type]  # OmegaConf keys are str here
    sections = {f.name for f in dataclasses.fields(SessionConfig)}
    return SessionConfig.from_mapping({name: values[name] for name in sections if name in values})


def run_hydra_app(
    train_fn: Callable[[Session, DictConfig], Any], cfg: DictConfig, rules: Mapping[str, Rule] | None = None
) -> Outcome:
    """Check the config, run `train_fn(session, cfg)` in Hydra's output directory, and end as a plain
    run or a sweep job should (see the module's text)."""
    try:
        config = session_config(cfg, rules)
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        sys.exit(ExitCode.USAGE)
    hydra = HydraConfig.get()
    ends_process = hydra.mode == RunMode.RUN  # a sweep: the launcher's job context (or none)
    outcome = run(lambda session: train_fn(session, cfg), hydra.runtime.output_dir, config,
                  JobContext(ends_process=True) if ends_process else None)  # fmt: skip
    if ends_process:
        exit_with(outcome)  # under SLURM (srun python app.py): requeues when that is the job's part
    return outcome
