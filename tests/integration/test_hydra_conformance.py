"""Hydra's own launcher conformance suites, run against hydra/launcher=preempt_local.

The suites, their test app (hydra.test_utils.a_module) and its configs
(hydra/test_utils/configs) and the fixtures (hydra.extra.pytest_plugin, a
pytest11 entry point) all ship in the hydra-core wheel: nothing is vendored.
Set up as Hydra's submitit plugin runs them
(plugins/hydra_submitit_launcher/tests/test_submitit_launcher.py) and, for the
batched sweeper, as tests/test_basic_launcher.py does.
"""

import json
import subprocess
import sys

import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)

from hydra_plugins.hydra_preempt_launcher.launcher import PreemptLauncher

pytestmark = pytest.mark.slow

LAUNCHER = "preempt_local"
# check=false: no scheduler to ask (preempt_local never asks; kept explicit). A short time limit
# as submitit's test has; the time-limit warning must come before it (the default lead, 120 s, would not).
OVERRIDES = ["hydra.launcher.check=false", "hydra.launcher.timeout_min=2", "hydra.launcher.signal_lead_s=30"]


@pytest.fixture(autouse=True)
def _fresh_hydra_version_base(hydra_restore_singletons):
    """The suites assume a fresh process, where Hydra's version base (a process-wide singleton) is unset
    (compat 1.1: jobs chdir into their output directory); earlier tests in this process set it to 1.3."""
    from hydra.version import _UNSPECIFIED_, VersionBase

    VersionBase.instance().version_base = _UNSPECIFIED_  # hydra_restore_singletons puts it back afterwards


def test_discovery() -> None:
    assert PreemptLauncher.__name__ in [x.__name__ for x in Plugins.instance().discover(Launcher)]


@pytest.mark.parametrize("launcher_name, overrides", [(LAUNCHER, OVERRIDES)])
class TestPreemptLocalLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    "launcher_name, overrides",
    # the suite extends this list in place; it is the class's only test, so that is harmless
    [(LAUNCHER, [*OVERRIDES, "hydra/sweeper=basic", "hydra.sweeper.max_batch_size=2"])],
)
class TestPreemptLocalLauncherBatched(BatchedSweeperTestSuite):
    pass


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [
        (
            {},
            [
                "-m",
                "hydra/hydra_logging=disabled",
                "hydra/job_logging=disabled",
                f"hydra/launcher={LAUNCHER}",
                *OVERRIDES,
            ],
        )
    ],
)
class TestPreemptLocalLauncherIntegration(IntegrationTestSuite):
    pass


# Beyond the suites: what they do not check.
APP = """
import json, os
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path=None)
def main(cfg):
    if cfg.get("fail"):
        raise ValueError("the task failed on purpose")
    h = HydraConfig.get()
    seen = {"dir": h.sweep.dir, "subdir": h.sweep.subdir, "output_dir": h.runtime.output_dir, "num": h.job.num}
    with open(os.path.join(h.runtime.output_dir, "seen.json"), "w") as f:
        json.dump(seen, f)

main()
"""


def launch(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "app.py").write_text(APP)
    args = [sys.executable, "app.py", "-m", f"hydra/launcher={LAUNCHER}", *OVERRIDES, *overrides]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_job_sees_the_sweep_dir_as_given_and_a_nested_subdir(tmp_path):
    done = launch(tmp_path, "hydra.sweep.dir=sweeps/a", "hydra.sweep.subdir=${hydra.job.num}/run", "+x=1,2")
    assert done.returncode == 0, done.stdout + done.stderr
    for num in (0, 1):
        seen = json.loads((tmp_path / "sweeps" / "a" / str(num) / "run" / "seen.json").read_text())
        # as Hydra's BasicLauncher shows them: relative stays relative, the subdir relative to the sweep dir
        assert seen == {
            "dir": "sweeps/a",
            "subdir": f"{num}/run",
            "output_dir": str(tmp_path / "sweeps" / "a" / str(num) / "run"),
            "num": num,
        }


def test_a_subdir_that_needs_the_job_id_is_refused_in_one_line(tmp_path):
    done = launch(tmp_path, "hydra.sweep.dir=sweeps/b", "hydra.sweep.subdir=${hydra.job.id}", "+x=1")
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "hydra.sweep.subdir cannot be resolved before the job is submitted" in out and "Traceback" not in out
    assert not (tmp_path / "sweeps" / "b" / "sweep_manifest.json").exists()


def test_a_failed_plain_job_says_it_failed(tmp_path):
    done = launch(tmp_path, "hydra.sweep.dir=sweeps/c", "+fail=true")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "job #0" in out and "failed: " in out and "the task failed on purpose" in out, out
    assert "not started" not in out
