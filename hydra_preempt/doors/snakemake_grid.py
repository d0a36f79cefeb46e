"""The experiment grid of the Snakemake workflow: parsed and checked before any job is planned.

    experiments:                       # one training run per entry
      - name: lr-0.01                  # the run's directory name: letters, digits, _ . -
        overrides: {optim.lr: 0.01}    # the app's overrides (Hydra key=value)
    common_overrides: {trainer.max_steps: 300}   # given to every experiment

Errors name the offending entry, so a bad grid fails at parse time, before
anything is submitted.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import ConfigError
from .settings import control_character

# The workflow config's one declaration (keys, types, ranges, defaults): Snakemake's validate() checks
# it in the Snakefile; this module checks what a schema cannot (duplicate names, Hydra key syntax).
SCHEMA = Path(__file__).with_name("snakemake_grid.schema.yaml")
# Matched against the whole string (fullmatch). A name is one safe path component: no "..", no
# hidden directory, no separator, no line break.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_KEY = re.compile(r"(?P<prefix>\+{0,2}|~)(?P<key>[A-Za-z_][A-Za-z0-9_.]*)")


@dataclass(frozen=True)
class Experiment:
    name: str
    overrides: tuple[str, ...]


def load_experiments(config: Mapping[str, Any]) -> dict[str, Experiment]:
    """The grid's experiments by name; ConfigError names the first bad entry."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"the workflow config must be a mapping, got {type(config).__name__}")
    known = workflow_keys()
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ConfigError(f"unknown workflow config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    entries = config.get("experiments")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("experiments must be a non-empty list of {name, overrides} entries: the grid is empty")
    _check_runs_dir(config.get("runs_dir", "runs/snakemake"))
    common = _overrides(config.get("common_overrides") or {}, "common_overrides")
    experiments: dict[str, Experiment] = {}
    for i, entry in enumerate(entries):
        where = f"experiments[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping with name and overrides, got {entry!r}")
        extra = sorted(set(entry) - {"name", "overrides"})
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}; an experiment has name and overrides")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: name must be letters, digits, _ . - not starting with . (it names one directory), got {name!r}"
            )
        if name in experiments:
            raise ConfigError(f"{where}: duplicate experiment name {name!r}")
        experiments[name] = Experiment(
            name, (*common, *_overrides(entry.get("overrides") or {}, f"{where} ({name}).overrides"))
        )
    return experiments


def hydra_quoted(text: str) -> str:
    """`text` as a quoted value of a Hydra override, which Hydra's parser reads back as exactly `text`
    (a backslash is escaped only before a quote and at the end, as Hydra's grammar wants)."""
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body) + "'"


def _check_runs_dir(runs_dir: Any) -> None:
    """runs_dir reaches each job as hydra.run.dir='RUNS_DIR/NAME' (quoted: every character but these
    stands for itself): refuse at parse time what the job's Hydra would refuse or change."""
    if not isinstance(runs_dir, str) or not runs_dir.strip():
        raise ConfigError(f"runs_dir must be a non-empty path, got {runs_dir!r}")
    if bad := control_character(runs_dir):
        raise ConfigError(f"runs_dir {runs_dir!r} contains {bad}: choose a path without control characters")
    if "{" in runs_dir or "}" in runs_dir:  # Snakemake reads braces in an output path as wildcards
        raise ConfigError(
            f"runs_dir {runs_dir!r} contains a brace, which Snakemake reads as a wildcard: choose a path without {{ }}"
        )
    if runs_dir.startswith("~"):
        raise ConfigError(
            f"runs_dir {runs_dir!r} starts with ~, which neither Snakemake nor Hydra expands: write the path out"
        )
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"hydra.run.dir={hydra_quoted(runs_dir + '/x')}")
    if override.value() != runs_dir + "/x":  # a guard on hydra_quoted: Hydra reads back the path as it is
        raise ConfigError(f"runs_dir {runs_dir!r} does not pass through Hydra's override grammar unchanged")


@functools.cache
def _schema_properties() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))["properties"]


def workflow_keys() -> dict[str, str]:
    """The workflow config's keys and their descriptions, from the schema."""
    return {key: spec.get("description", "") for key, spec in _schema_properties().items()}


def workflow_defaults() -> dict[str, Any]:
    """The workflow config's keys that have a default, with it, from the schema."""
    return {key: spec["default"] for key, spec in _schema_properties().items() if "default" in spec}


def train_resources(config: Mapping[str, Any]) -> dict[str, Any]:
    """The train rule's resources for snakemake-executor-plugin-slurm, from the grid's settings.

    One task: the executor wraps the job's command in `srun -n1` and asks `--gpus=gpus`. Several tasks
    (nodes x tasks_per_node): the resource `mpi` tells the executor that the command starts its own
    tasks (`srun python ...`, their process group formed by the session): it submits `--nodes` and
    `--ntasks` and no `srun -n1`. Its `gpu` resource would ask `--gpus=N` for the whole job and
    `--ntasks-per-gpu`, so the GPUs go as `--gpus-per-node` instead, as the grid means them."""
    tasks = config["nodes"] * config["tasks_per_node"]
    # The time-limit warning. TERM, not USR2: inside the job step it also reaches the job's inner
    # snakemake, which exits on USR2 but waits for its running job on TERM.
    # --open-mode=append: a requeued job appends to its log instead of truncating the first run's
    extra = f"--signal=TERM@{config['signal_lead_s']} --open-mode=append"
    resources = {
        "runtime": config["runtime_min"],
        "cpus_per_task": config["cpus_per_task"],
        "mem_mb": config["mem_mb"],
        "gpu": config["gpus"] if tasks == 1 else 0,
        "slurm_extra": extra,
    }
    if tasks > 1:
        gpus = f" --gpus-per-node={config['gpus']}" if config["gpus"] else ""
        resources.update(mpi="srun", tasks=tasks, nodes=config["nodes"], slurm_extra=extra + gpus)
    return resources


def train_command(config: Mapping[str, Any]) -> str:
    """The shell command's start: `exec` (the shell becomes python, so no shell layer can die of the
    preemption SIGTERM while python saves); with several tasks `exec srun`, which passes the signal
    on to every task and waits for them."""
    return "exec srun " if config["nodes"] * config["tasks_per_node"] > 1 else "exec "


def _overrides(mapping: Any, where: str) -> tuple[str, ...]:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where} must be a mapping of key: value, got {mapping!r}")
    out = []
    for key, value in mapping.items():
        m = _KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise ConfigError(f"{where}: {key!r} is not a Hydra config key")
        bare = m["key"]
        if bare == "hydra" or bare.startswith("hydra."):
            raise ConfigError(
                f"{where}: {key} is Hydra's own configuration, which the workflow sets (each experiment runs "
                "in runs_dir/NAME); put training settings in the grid"
            )
        if isinstance(value, (Mapping, list)):
            raise ConfigError(f"{where}.{key} must be a single value, got {value!r}")
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        bad = control_character(text)
        if bad:
            raise ConfigError(f"{where}.{key} must not contain a line break or control character (found {bad})")
        override = f"{key}={text}"
        problem = hydra_override_problem(override)
        if problem:
            raise ConfigError(f"{where}: {override!r} is not a valid Hydra override ({problem})")
        out.append(override)
    return tuple(out)


def hydra_override_problem(override: str) -> str | None:
    """Why Hydra's own override parser refuses `override` (one line), or None. A sweep (a,b) is refused:
    one experiment is one run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except HydraException as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if parsed.is_sweep_override():
        return "a sweep; give each value its own experiment"
    return None
