"""The generated documentation is current: the configuration reference matches the settings' declaration."""

from tools.generate_docs import main, reference


def test_the_generated_pages_are_current():
    assert main(["--check"]) == 0, "a generated page is stale: run python -m tools.generate_docs"


def test_every_setting_is_in_the_reference():
    from dataclasses import fields

    from hydra_preempt.config import SessionConfig

    text = reference()
    for section in fields(SessionConfig):
        for field in fields(type(getattr(SessionConfig(), section.name))):
            assert f"| `{section.name}.{field.name}` |" in text
