"""The README's complete Python programs run as written (from a fresh directory), twice: the second
start of a finished run resumes, does nothing and finishes again."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
PROGRAMS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if b.startswith("import")]


def test_the_readme_has_complete_programs():
    assert PROGRAMS, "no ```python block of the README starts with an import"


@pytest.mark.slow
@pytest.mark.parametrize("program", PROGRAMS, ids=[f"program{i}" for i in range(len(PROGRAMS))])
def test_a_readme_program_runs_and_resumes(tmp_path, program):
    script = tmp_path / "example.py"
    script.write_text(program)
    for start in ("first", "again"):
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{start} start:\n{done.stderr[-3000:]}"
    assert "[hydra_preempt] resumed from" in done.stderr and "finished at step" in done.stderr
