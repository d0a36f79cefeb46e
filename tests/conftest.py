import subprocess
import uuid
from pathlib import Path

import pytest


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real tmpfs of a given size (root only): a file system that can really fill up."""
    mounts = []

    def mount(size: str, options: str = "") -> Path:
        target = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
        target.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture(autouse=True)
def _no_stray_signal_handlers():
    """Every test must leave the process's signal handlers as it found them."""
    import signal

    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
    before = {s: signal.getsignal(s) for s in watched}
    yield
    after = {s: signal.getsignal(s) for s in watched}
    assert after == before, "a test left a signal handler installed"
