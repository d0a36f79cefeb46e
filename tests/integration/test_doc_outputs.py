"""Output shown in the documentation is what the commands shown print: `make demo`'s (tools/demo.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HASH = re.compile(r"params_sha256 [0-9a-f]{16}\.\.\.")

pytestmark = pytest.mark.slow


def shown_demo_output() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("`make demo` prints, in about half\na minute:\n\n```\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


def test_the_demo_prints_what_the_readme_shows(tmp_path):
    """Line for line, except the run directories' timestamped path. The parameters' hash is compared as
    a shape (it depends on the CPU's kernels; both runs must print the same one, which "identical: yes" says)."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    printed = [line for line in done.stdout.splitlines() if not line.startswith("Run directories under")]
    while printed and not printed[0].strip():
        printed.pop(0)
    assert [HASH.sub("params_sha256 <hash>", line) for line in printed] == [
        HASH.sub("params_sha256 <hash>", line) for line in shown_demo_output()
    ]
    hashes = HASH.findall(done.stdout)
    assert len(hashes) == 2 and hashes[0] == hashes[1]
