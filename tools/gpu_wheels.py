"""Wheels for a GPU machine without network: hydra_preempt and what it needs there besides torch.

    python -m tools.gpu_wheels [--dest .whl] [--python 3.12]          (make gpu-wheels)

Run where the package registry can be reached. It builds this project's wheel
and downloads, for CPython `--python` on x86-64 Linux, the pure-Python packages
the kit and the CUDA tests import that a CUDA image with torch does not hold
(REQUIRED, at the versions installed beside this interpreter, as tested here).
`--dest` is emptied first: one version of each, nothing stale. On the GPU machine:

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \\
        && PYTHONPATH=/tmp/site python3 -m tools.gpu_kit

torch, numpy, nvidia-ml-py, xxhash, safetensors, pyyaml and pytest are taken from
that machine (--no-deps never touches its torch).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported by hydra_preempt's doors, train.py and the tests' conftest, absent from a CUDA image.
REQUIRED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "submitit")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pinned(name: str) -> str:
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        raise SystemExit(
            f"gpu_wheels: {name} is not installed beside {sys.executable}: run `make install` first"
        ) from None


def prepare(dest: Path, python: str) -> list[Path]:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(ROOT)], check=True)
    for spec in map(pinned, REQUIRED):
        download = [*pip, "download", "--no-deps", "-d", str(dest), spec]
        target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
        target += [arg for p in PLATFORMS for arg in ("--platform", p)]
        if subprocess.run([*download, *target], capture_output=True).returncode != 0:
            # a source distribution only (antlr4-python3-runtime 4.9.3): built here, pure Python
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), spec], check=True)
    for sdist in dest.glob("*.tar.gz"):
        sdist.unlink()
    return sorted(dest.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version (X.Y)")
    args = parser.parse_args(argv)
    wheels = prepare(args.dest, args.python)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 1e6:6.2f} MB  {wheel.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
