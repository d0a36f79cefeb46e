"""The `hydra-preempt` command. Light: `status` reads run directories and asks the scheduler, no torch."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .errors import HydraPreemptError, OutputWriteError
from .outcome import ExitCode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hydra-preempt", description="Preemption-safe training on SLURM.")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="where every job of a sweep, or a run, stands")
    status.add_argument(
        "dirs", type=Path, nargs="+", help="sweep directories (hydra.sweep.dir) or run directories (Snakemake's, yours)"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    export = sub.add_parser("export", help="write a model's full weights from a checkpoint as a safetensors file")
    export.add_argument("run_dir", type=Path, help="the run directory")
    export.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    export.add_argument("--step", type=int, help="the checkpoint's step (default: the newest good checkpoint)")
    export.add_argument(
        "--object",
        help="the registered object to export, or a dotted path into its state (default: model, or a Lightning "
        "run's lightning.state_dict, a Trainer run's transformers.model)",
    )
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    watch = sub.add_parser("monitor", help="follow jobs, classify their ends and requeue per the restart policy")
    watch.add_argument("dirs", type=Path, nargs="+", help="sweep directories or run directories")
    watch.add_argument("--interval", type=float, default=60.0, help="seconds between rounds (default 60)")
    watch.add_argument("--once", action="store_true", help="one round, then exit")
    watch.add_argument("--failures", type=Path, help="a failure table replacing the shipped one")
    watch.add_argument(
        "--patience",
        type=positive_int,
        default=10,
        help="polls in a row without a usable answer from SLURM about a job before it is given up (default 10)",
    )
    validate = sub.add_parser("validate", help="check the protocol on this machine: saves, signals, resume, disk")
    validate.add_argument(
        "--checkpoint-dir", type=Path, help="where checkpoints will go (default: a temporary directory)"
    )
    validate.add_argument(
        "--state-gb", type=positive_gb, help="your training state's size in GB, to predict its save time"
    )
    validate.add_argument("--qos", help="the QoS whose GraceTime the save must fit (default: the shortest one)")
    validate.add_argument("--slurm", action="store_true", help="also check SLURM's settings and run a tiny test job")
    validate.add_argument("--account", help="with --slurm: the account to submit the test job with")
    validate.add_argument("--partition", help="with --slurm: the partition to submit the test job to")
    validate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    flow = sub.add_parser("workflow", help="the Snakemake workflow shipped in the package: its path, or a starter")
    flow_sub = flow.add_subparsers(dest="action", required=True)
    flow_sub.add_parser("path", help="print the packaged Snakefile's path (for `module ... snakefile:`)")
    init = flow_sub.add_parser("init", help="write a starter: Snakefile, experiments.yaml, local/ and slurm/ profiles")
    init.add_argument("dir", type=Path, nargs="?", default=Path("."), help="where to write it (default: here)")
    init.add_argument(
        "--script", required=True, help="your training app, as the jobs will run it from DIR (e.g. train.py)"
    )
    sub.add_parser(  # its arguments are torchrun's, passed on as they are (argparse cannot take them here)
        "torchrun", help="torchrun whose agent leaves the stop signals to the workers and passes their exit 75 on"
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["torchrun"]:
        from .doors.torchrun import main as torchrun

        return torchrun(argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            return show_status(args.dirs, args.json)
        if args.command == "export":
            from .checkpoint.export import export_weights

            step, count, name = export_weights(args.run_dir, args.out, args.step, args.object, args.force)
            print(f"wrote {count} tensors of {name!r} from the checkpoint of step {step} to {args.out}")
            return ExitCode.FINISHED
        if args.command == "monitor":
            from .doors.monitor import monitor
            from .slurm.failures import FailureTable

            return monitor(
                args.dirs, FailureTable.load(args.failures), args.interval, args.once, patience=args.patience
            )
        if args.command == "validate":
            return validate_command(args)
        if args.command == "workflow":
            return workflow_command(args)
    except OutputWriteError as e:  # the machine (disk full, I/O error), not the input
        print(f"hydra-preempt: {e}", file=sys.stderr)
        return ExitCode.FAILED
    except HydraPreemptError as e:
        print(f"hydra-preempt: {e}", file=sys.stderr)
        return ExitCode.USAGE
    return ExitCode.USAGE


def workflow_command(args: argparse.Namespace) -> int:
    from .doors.workflow import SNAKEFILE, init_workflow

    if args.action == "path":
        print(SNAKEFILE)
        return ExitCode.FINISHED
    written = init_workflow(args.dir, args.script)
    print("wrote " + ", ".join(str(p) for p in written))
    print(
        f"next: cd {args.dir} && snakemake --profile local   (or --profile slurm, after setting your account in slurm/)"
    )
    return ExitCode.FINISHED


def positive_gb(text: str) -> float:
    """--state-gb: a finite number > 0 (argparse reports anything else in one line, exit 2)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


def positive_int(text: str) -> int:
    """--patience: an integer > 0 (argparse reports anything else in one line, exit 2)."""
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def validate_command(args: argparse.Namespace) -> int:
    """Raises HydraPreemptError (exit 2) when --slurm is asked for and SLURM does not answer."""
    from .validate import FAIL, exit_code, format_rows, validate

    started = time.monotonic()
    if args.slurm:
        from .validate.slurm import require_slurm, slurm_rows

        require_slurm()  # before anything runs: the one line a user without SLURM needs
    rows = validate(args.checkpoint_dir, args.state_gb, args.qos)
    if args.slurm:
        # The job's log must be where the compute node can write it: the checkpoint directory (shared
        # storage, by its purpose) or else the current directory, never this host's /tmp
        rows += slurm_rows(args.checkpoint_dir or Path.cwd(), args.qos, args.account, args.partition)
    code = exit_code(rows)
    if args.json:
        report = {"ok": code == 0, "seconds": round(time.monotonic() - started, 1), "rows": [asdict(r) for r in rows]}
        print(json.dumps(report, indent=1))
    else:
        print(format_rows(rows))
        failed = sum(r.status == FAIL for r in rows)
        print(f"{len(rows)} checks, {failed} failed, in {time.monotonic() - started:.0f} s")
    return code


def show_status(dirs: list[Path], as_json: bool) -> int:
    from .doors.hydra_sweep import format_table, status_rows

    rows = [row for path in dirs for row in status_rows(path)]
    print(json.dumps(rows, indent=1) if as_json else format_table(rows))
    return ExitCode.FINISHED


if __name__ == "__main__":
    sys.exit(main())
