"""The workflow shipped in the wheel, for a user's own app, from a directory outside the repository.

The package is built as a wheel from the working tree and installed (not editable) into a directory of
its own, which PYTHONPATH puts before the repository's editable install: the jobs import that copy.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples" / "hydra_app"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The package installed from a wheel built out of the working tree's files (not a stale build/)."""
    work = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    source = work / "src"
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name, follow_symlinks=False)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work), str(source)], check=True)
    (wheel,) = work.glob("hydra_preempt-*.whl")
    target = work / "site"
    subprocess.run([*pip, "install", "--no-index", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def installed_env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}


def test_the_package_holds_the_workflow_and_the_jobs_import_the_installed_copy(site):
    """With this environment (the one the workflow's local jobs inherit) python imports the wheel's copy."""
    env = installed_env(site)
    imported = subprocess.run(
        [sys.executable, "-c", "import hydra_preempt; print(hydra_preempt.__file__)"],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(imported.stdout.strip()).is_relative_to(site), imported.stdout
    where = subprocess.run(
        [str(site / "bin" / "hydra-preempt"), "workflow", "path"], env=env, capture_output=True, text=True, check=True
    )
    snakefile = Path(where.stdout.strip())
    assert snakefile.is_relative_to(site) and snakefile.is_file(), snakefile
    shipped = {p.relative_to(snakefile.parent).as_posix() for p in snakefile.parent.rglob("*") if p.is_file()}
    assert {
        "Snakefile",
        "rules/train.smk",
        "rules/summarize.smk",
        "scripts/summarize.py",
        "config/experiments.yaml",
        "profiles/local/config.v8+.yaml",
        "profiles/slurm/config.v8+.yaml",
    } <= shipped


def test_own_app_runs_through_the_starter_workflow_without_naming_a_target(site, tmp_path):
    """The README's steps: copy the template app, `hydra-preempt workflow init`, set the grid, run
    `snakemake --profile local` (no target named). Both experiments finish; the summary holds the
    app's own result keys; a second run has nothing to do."""
    project = tmp_path / "project"
    shutil.copytree(TEMPLATE, project)
    env = installed_env(site)
    init = subprocess.run(
        [str(site / "bin" / "hydra-preempt"), "workflow", "init", ".", "--script", "app.py"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert init.returncode == 0, init.stderr
    grid = yaml.safe_load((project / "experiments.yaml").read_text())
    assert grid["train_script"] == "app.py"
    grid["common_overrides"] = {"trainer.epochs": 1}
    grid["experiments"] = [{"name": "small", "overrides": {"model.hidden": 8}}, {"name": "wide"}]
    grid["runs_dir"] = "runs/étude #1;a,b"  # Hydra's override grammar would read ',' and ';' as its own syntax
    (project / "experiments.yaml").write_text(yaml.safe_dump(grid))

    def snakemake() -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "--profile", "local"]
        return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)

    done = snakemake()
    assert done.returncode == 0, done.stdout + done.stderr
    with open(project / "results" / "snakemake" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["experiment"] for r in rows] == ["small", "wide"]
    assert all(r["step"] == "32" and float(r["loss"]) > 0 and r["preemptions"] == "0" for r in rows), rows
    assert rows[0]["overrides"] == "trainer.epochs=1 model.hidden=8"
    assert (project / "runs" / "étude #1;a,b" / "small" / "checkpoints").is_dir()
    again = snakemake()
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.parametrize(
    "script, said",
    [
        ("print('trained, but wrote nothing')\n", "ended with exit 0 but wrote no"),
        (None, "does not exist (set train_script in the grid)"),
    ],
)
def test_an_app_that_breaks_the_contract_is_named_in_one_line(tmp_path, script, said):
    """An app that exits 0 without result.json, or a train_script that is not there: the job fails with
    one line saying what the workflow needs (not Snakemake's MissingOutputException alone)."""
    if script is not None:
        (tmp_path / "app.py").write_text(script)
    grid = {"train_script": "app.py", "experiments": [{"name": "only"}]}
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(grid))
    from hydra_preempt.doors.workflow import STARTER_SNAKEFILE

    (tmp_path / "Snakefile").write_text(STARTER_SNAKEFILE)
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and said in out, out
    assert not (tmp_path / "runs" / "snakemake" / "only" / "result.json").exists()
