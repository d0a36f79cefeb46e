"""A Hydra callback that checks the output directory before Hydra creates it.

    hydra:
      callbacks:
        run_dir:
          _target_: hydra_plugins.hydra_preempt_launcher.callbacks.RunDirCheck

Hydra creates hydra.run.dir (or hydra.sweep.dir) itself, before the task
function runs: an unusable one (a path under a regular file, /proc/x) ends
in Hydra's traceback and exit code 1. This callback creates it first, so
that the same mistake ends with one line naming the directory and exit 2
(usage: nothing was changed), as any other bad configuration does.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hydra_preempt.errors import CheckpointDirError
from hydra_preempt.outcome import ExitCode
from hydra_preempt.rundir import create_run_dir


class RunDirCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _create_or_exit(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _create_or_exit(config.hydra.sweep.dir, "hydra.sweep.dir")


def _create_or_exit(path: str, key: str) -> None:
    try:
        create_run_dir(path)
    except CheckpointDirError as e:
        print(f"Error in {key}: {e}", file=sys.stderr)
        sys.exit(ExitCode.USAGE)
