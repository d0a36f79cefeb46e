"""The generated documentation is current: the configuration reference matches the settings' declaration."""

from tools.config_reference import main, reference


def test_the_configuration_reference_is_current():
    assert main(["--check"]) == 0, "docs/configuration-reference.md is stale: run python -m tools.config_reference"


def test_every_setting_is_in_the_reference():
    from dataclasses import fields

    from hydra_preempt.config import SessionConfig

    text = reference()
    for section in fields(SessionConfig):
        for field in fields(type(getattr(SessionConfig(), section.name))):
            assert f"| `{section.name}.{field.name}` |" in text
