"""submitit's local executor, through the submitit door and the Hydra launcher: code from the user's own modules
reaches the job (their folders travel with it), the job's log shows the library's lines, and a module the job
cannot import is named in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TEMPLATE = Path(__file__).resolve().parents[2] / "examples" / "hydra_app"

TRAIN_MODULE = """\
import torch


def train(session):
    model = torch.nn.Linear(2, 1)
    session.register(model=model)
    session.restore()
    for _ in session.steps(5):
        pass
    return {"step": session.step}
"""

LAUNCH = """\
from hydra_preempt import PreemptibleTask, preemptible_executor
from my_train import train  # beside this script: on its sys.path, not on the job's

executor = preemptible_executor("logs", cluster="local", timeout_min=5)
job = executor.submit(PreemptibleTask(train, "run"))
print("RESULT", job.result())
print(job.stderr())
"""


def test_a_function_from_a_module_beside_the_launch_script_reaches_the_job(tmp_path):
    """`python scripts/launch.py` from the project root: the job's python has the root, not scripts/, on
    sys.path; without the folder travelling with the function this fails with ModuleNotFoundError."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "my_train.py").write_text(TRAIN_MODULE)
    (tmp_path / "scripts" / "launch.py").write_text(LAUNCH)
    done = subprocess.run(
        [sys.executable, "scripts/launch.py"], cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RESULT {'step': 5}" in done.stdout
    job_log = done.stdout.split("RESULT", 1)[1]  # the job's stderr (submitit's log file)
    for line in ("[hydra_preempt] no checkpoint in run/checkpoints: starting at step 0", "[hydra_preempt] finished"):
        assert line in job_log, job_log


def test_a_module_the_job_cannot_import_is_named_in_one_message(tmp_path):
    """The folder is gone when the job starts (not shared with the nodes): the error names the module,
    where it came from and what to do."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "gone_train.py").write_text(TRAIN_MODULE)
    pickled = tmp_path / "task.pkl"
    dump = textwrap.dedent(f"""
        import pickle, sys
        sys.path.insert(0, {str(folder)!r})
        from gone_train import train
        from hydra_preempt import PreemptibleTask
        open({str(pickled)!r}, "wb").write(pickle.dumps(PreemptibleTask(train, "run")))
    """)
    subprocess.run([sys.executable, "-c", dump], check=True, timeout=120)
    shutil.rmtree(folder)
    load = f"import pickle; pickle.loads(open({str(pickled)!r}, 'rb').read())"
    done = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(
        "hydra_preempt.errors.HydraPreemptError: the training function cannot be loaded in the job"
    )
    assert "No module named 'gone_train'" in message and str(folder) in message and "PYTHONPATH" in message


def test_a_hydra_app_sweep_reaches_the_modules_beside_the_app(tmp_path):
    """`python src/app.py -m hydra/launcher=preempt_local` from the project root, the app importing a
    module beside it: the launcher's jobs (submitit) unpickle the app with src/ on their sys.path."""
    shutil.copytree(TEMPLATE, tmp_path / "src")
    app = tmp_path / "src" / "app.py"
    app.write_text(
        app.read_text()
        .replace("import hydra\n", "import hydra\nimport sibling\n", 1)
        .replace("torch.nn.GELU()", "sibling.activation()", 1)
    )
    (tmp_path / "src" / "sibling.py").write_text("import torch\n\n\ndef activation():\n    return torch.nn.GELU()\n")
    sweep = tmp_path / "sweep"
    command = [sys.executable, "src/app.py", "-m", "hydra/launcher=preempt_local", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(
        [*command, "trainer.epochs=1", "optim.lr=0.01,0.001"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(json.loads(p.read_text())["step"] for p in sweep.glob("*/result.json")) == [32, 32]
