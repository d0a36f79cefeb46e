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


def test_the_site_builds_strictly(tmp_path):
    """mkdocs --strict: a broken link, a missing anchor or a page outside the navigation fails."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "own-script" / "index.html").exists()
