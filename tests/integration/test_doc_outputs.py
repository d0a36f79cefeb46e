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


# Where a SIGTERM lands is timing: the demo signals after a step is printed and the run stops at the next
# boundary it reaches, that step or a later one. These numbers are compared as a shape and checked for sense.
TIMED = re.compile(r"(after step|stopped at step|resumed from step) (\d+)")


def shape(lines: list[str]) -> list[str]:
    return [TIMED.sub(r"\1 <n>", HASH.sub("params_sha256 <hash>", line)) for line in lines]


def check_the_steps_add_up(lines: list[str]) -> None:
    """Each preempted start stops at or after the step it was signalled at; each start resumes where the
    previous one stopped; the first from 0."""
    sent = [int(n) for n in re.findall(r"after step (\d+)", "\n".join(lines))]
    starts = re.findall(r"resumed from step (\d+), stopped at step (\d+)", "\n".join(lines))
    resumed, stopped = [int(r) for r, _ in starts], [int(s) for _, s in starts]
    assert len(starts) == len(sent) + 1, lines
    assert resumed == [0, *stopped[:-1]], lines
    assert all(s <= t <= s + 5 for s, t in zip(sent, stopped)), lines


def test_the_demo_prints_what_the_readme_shows(tmp_path):
    """Line for line, except the run directories' timestamped path and the steps a signal landed at (checked
    for sense). The parameters' hash is compared as a shape (it depends on the CPU's kernels; both runs must
    print the same one, which "identical: yes" says)."""
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
    assert shape(printed) == shape(shown_demo_output())
    check_the_steps_add_up(printed)
    check_the_steps_add_up(shown_demo_output())
    hashes = HASH.findall(done.stdout)
    assert len(hashes) == 2 and hashes[0] == hashes[1]
