"""train.py's configuration check: every key of its own sections, the session's sections, no other section."""

import copy
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import train
from hydra_preempt.config import check_app_config
from hydra_preempt.errors import CheckpointDirError, ConfigError
from hydra_preempt.rundir import create_run_dir

CONF = Path(train.__file__).parent / "conf" / "config.yaml"


@pytest.fixture(scope="module")
def defaults() -> dict:
    values = OmegaConf.to_container(OmegaConf.load(CONF), resolve=False)
    assert isinstance(values, dict)
    del values["hydra"]  # Hydra removes its section before the task function sees the config
    return values


def with_value(config: dict, key: str, value) -> dict:
    config = copy.deepcopy(config)
    *sections, name = key.split(".")
    node = config
    for section in sections:
        node = node.setdefault(section, {})
    node[name] = value
    return config


def test_the_shipped_config_passes_and_every_own_key_has_a_rule(defaults):
    config = check_app_config(defaults, train.KEYS)
    assert config.checkpoint.every_steps == 50
    own = {f"{s}.{k}" for s in ("trainer", "model", "data", "optim") for k in defaults[s]}
    assert own == set(train.KEYS)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("trainer.max_steps", "abc", "trainer.max_steps must be a positive integer below 2**62, got 'abc'"),
        ("trainer.max_steps", 0, "trainer.max_steps must be a positive integer below 2**62, got 0"),
        ("trainer.max_steps", True, "trainer.max_steps must be a positive integer below 2**62, got True"),
        ("trainer.threads", 0, "trainer.threads must be an integer from 1 to 4096, got 0"),
        ("trainer.threads", 10**11, "trainer.threads must be an integer from 1 to 4096, got 100000000000"),
        ("trainer.seed", 2**64, f"trainer.seed must be an integer >= 0 below 2**62, got {2**64}"),
        ("trainer.batch_size", 2.5, "trainer.batch_size must be a positive integer below 2**62, got 2.5"),
        ("trainer.seed", -1, "trainer.seed must be an integer >= 0 below 2**62, got -1"),
        ("trainer.step_sleep", math.inf, "trainer.step_sleep must be a finite number >= 0, got inf"),
        ("trainer.parallel", "tp", "trainer.parallel must be ddp or fsdp, got 'tp'"),
        ("model.hidden", -3, "model.hidden must be a positive integer below 2**62, got -3"),
        ("model.dropout", 1.0, "model.dropout must be a number in [0, 1), got 1.0"),
        ("model.dropout", math.nan, "model.dropout must be a number in [0, 1), got nan"),
        ("data.noise", "x", "data.noise must be a finite number >= 0, got 'x'"),
        ("optim.lr", -1, "optim.lr must be a finite number > 0, got -1"),
        ("optim.lr", 0.0, "optim.lr must be a finite number > 0, got 0.0"),
        ("optim.weight_decay", None, "optim.weight_decay must be a finite number >= 0, got None"),
        ("trainer.foo", 1, "unknown key(s) trainer.foo; known: batch_size, log_every"),
        ("chekpoint.every", 5, "unknown section(s) chekpoint; known: checkpoint, data"),
        ("checkpoint.evry", 3, "unknown key(s) checkpoint.evry; known: async_save"),
        ("checkpoint.every_seconds", math.nan, "checkpoint.every_seconds must be a finite number, got nan"),
        ("checkpoint.every_seconds", math.inf, "checkpoint.every_seconds must be a finite number, got inf"),
    ],
)
def test_a_bad_key_is_refused_naming_it(defaults, key, value, message):
    with pytest.raises(ConfigError) as e:
        check_app_config(with_value(defaults, key, value), train.KEYS)
    assert str(e.value).startswith(message)


def test_a_missing_key_or_section_is_refused(defaults):
    config = copy.deepcopy(defaults)
    del config["trainer"]["seed"]
    with pytest.raises(ConfigError, match=r"^trainer\.seed is missing$"):
        check_app_config(config, train.KEYS)
    del config["model"]
    with pytest.raises(ConfigError, match=r"^model must be a mapping, got None$"):
        check_app_config(config, train.KEYS)


def test_an_unusable_run_directory_is_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointDirError, match=r"run directory .*a-file/run is not usable: Not a directory"):
        create_run_dir(tmp_path / "a-file" / "run")
    assert create_run_dir(tmp_path / "new" / "run").is_dir()
