"""The `hydra-preempt` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import HydraPreemptError
from .outcome import ExitCode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hydra-preempt", description="Preemption-safe training on SLURM.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train locally, preempt with SIGTERM twice, resume, compare with an uninterrupted run")
    demo.add_argument("--dir", type=Path, default=Path("demo-runs"), help="where run directories go (default: demo-runs)")
    demo.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.dir, args.steps)
    except HydraPreemptError as e:
        print(f"hydra-preempt: {e}", file=sys.stderr)
        return ExitCode.USAGE
    return ExitCode.USAGE


if __name__ == "__main__":
    sys.exit(main())
