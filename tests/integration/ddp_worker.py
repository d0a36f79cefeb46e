"""One rank of a 2-rank gloo run of train.py's training function (started by test_multi_rank.py)."""

import functools
import sys

import torch.distributed as dist
from hydra import compose, initialize_config_dir

import train
from hydra_preempt import run
from tests.e2e.helpers import ROOT

if __name__ == "__main__":
    run_dir, overrides = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    outcome = run(functools.partial(train.train, cfg=cfg), run_dir, train.session_config(cfg))
    print(f"rank {dist.get_rank()}: {outcome.status.value} at step {outcome.step}", flush=True)
    dist.destroy_process_group()  # gloo's threads end before the process does
    sys.exit(int(outcome.exit_code))
