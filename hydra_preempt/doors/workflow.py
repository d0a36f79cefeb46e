"""The Snakemake workflow as shipped in the package: where it is, a starter for a project, and the job wrapper.

    hydra-preempt workflow init DIR --script train.py   # DIR/Snakefile, experiments.yaml, local/, slurm/
    hydra-preempt workflow path                          # the packaged Snakefile, for `module ... snakefile:`

The app contract (README "Your own app in the workflow"): the training rule runs

    python -m hydra_preempt.doors.workflow SCRIPT RUN_DIR KEY=VALUE ...

which runs SCRIPT in this process as `SCRIPT hydra.run.dir=RUN_DIR KEY=VALUE ...` (a Hydra app built on
run_hydra_app takes exactly that), then checks what the workflow needs of it: a finished run (exit 0)
left RUN_DIR/result.json. The same process, not a child: the preemption SIGTERM reaches the app's own
handler directly, with nothing in between that could die of it.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..outcome import ExitCode
from ..rundir import RESULT_FILE
from .snakemake_grid import hydra_quoted, workflow_defaults

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "workflow"
SNAKEFILE = WORKFLOW_DIR / "Snakefile"
PROFILES = ("local", "slurm")

STARTER_SNAKEFILE = """\
# snakemake --profile local : the experiments of experiments.yaml on this machine
# snakemake --profile slurm : the same on SLURM's preemptible QoS (your default account and partition, or set them in slurm/)
# The rules are hydra_preempt's, from the installed package (hydra-preempt workflow path).
from hydra_preempt.doors.workflow import SNAKEFILE

configfile: "experiments.yaml"


include: str(SNAKEFILE)


rule default:  # run everything without naming a target (Snakemake ignores an included file's default)
    input:
        rules.all.input,
    default_target: True
"""


GRID_HEADER = """\
# The experiment grid (docs/snakemake.md): each experiment is one run of train_script, given
# hydra.run.dir=RUNS_DIR/NAME and its overrides, KEY: VALUE pairs of your app's own config.
# Example:  experiments: [{name: lr-0.01, overrides: {optim.lr: 0.01}}, {name: lr-0.001, overrides: {optim.lr: 0.001}}]
"""


def starter_grid(script: str) -> str:
    """A grid for `script` that names none of train.py's keys: one experiment, no overrides."""
    grid = {
        "train_script": script,
        **{k: v for k, v in workflow_defaults().items() if k != "train_script"},  # the schema's, spelt out
        "common_overrides": {},
        "experiments": [{"name": "baseline", "overrides": {}}],
    }
    return GRID_HEADER + yaml.safe_dump(grid, sort_keys=False)


def init_workflow(directory: Path, script: str) -> list[Path]:
    """Write a starter workflow into `directory` for the training script `script` (a path as the rule
    will run it, relative to the directory snakemake runs in). Refuses, before writing anything, a file
    (or link) that exists where one would go; a write that fails removes what this call wrote."""
    if not script or any(c in script for c in "\n\r\0"):
        raise ConfigError(f"--script must be a file name without line breaks, got {script!r}")
    files = {directory / "Snakefile": STARTER_SNAKEFILE, directory / "experiments.yaml": starter_grid(script)}
    for profile in PROFILES:
        files[directory / profile / "config.v8+.yaml"] = (
            WORKFLOW_DIR / "profiles" / profile / "config.v8+.yaml"
        ).read_text()
    existing = [str(path) for path in files if os.path.lexists(path)]
    if existing:
        raise ConfigError(f"{', '.join(existing)} exist(s); nothing written (remove them or choose another directory)")
    not_dirs = [
        str(d) for d in {directory, directory / "local", directory / "slurm"} if os.path.lexists(d) and not d.is_dir()
    ]
    if not_dirs:
        raise ConfigError(f"{', '.join(sorted(not_dirs))} exist(s) and are no directories; nothing written")
    written: list[Path] = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x") as f:  # never through a link made meanwhile
                f.write(text)
            written.append(path)
    except OSError as e:
        for path in written:
            path.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the starter into {directory}: {e.strerror or e}; nothing kept") from None
    return written


def run_job(script: Path, run_dir: Path, overrides: list[str]) -> int:
    """Run one experiment's training script in this process and check the workflow's contract."""
    if not script.is_file():
        print(
            f"hydra-preempt workflow: train_script {script} does not exist (set train_script in the grid)",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    sys.argv = [str(script), f"hydra.run.dir={hydra_quoted(str(run_dir))}", *overrides]
    sys.path.insert(0, str(script.resolve().parent))  # as `python SCRIPT` would: the script's own imports
    try:
        runpy.run_path(str(script), run_name="__main__")
        code: object = 0
    except SystemExit as e:
        code = e.code
    # sys.exit(256) ends the process with status 0 too (the OS keeps the low 8 bits)
    finished = code is None or (isinstance(code, int) and code % 256 == 0)
    if finished and not (run_dir / RESULT_FILE).is_file():
        print(
            f"hydra-preempt workflow: {script} ended with exit 0 but wrote no {run_dir / RESULT_FILE}; the workflow "
            "needs it: train through hydra_preempt.run() or run_hydra_app() (they write the dict the training "
            "function returns), or call session.write_result()",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    if code is None or isinstance(code, int):
        return (code or 0) % 256
    print(code, file=sys.stderr)  # sys.exit("message"), as python itself would
    return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m hydra_preempt.doors.workflow SCRIPT RUN_DIR [KEY=VALUE ...]", file=sys.stderr)
        return ExitCode.USAGE
    return run_job(Path(args[0]), Path(args[1]), args[2:])


if __name__ == "__main__":
    sys.exit(main())
