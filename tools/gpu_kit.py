"""The GPU kit: every CUDA path of hydra_preempt checked on a real GPU, with one report.

    python -m tools.gpu_kit [--out DIR] [--gb 10] [--only SECTION,...]     (make gpu-check)

Sections, each under its own time limit, each written to the report as it ends:
  environment   torch, CUDA, the GPU and its driver; torch against the project's declared range
  tests         the suite's CUDA tests (tests/cuda, marker `cuda`): exact resume with CUDA RNG
                under SIGTERM, FSDP2 over NCCL through the sharded path, pinned staging, NVML,
                validate's GPU and NCCL rows, a checkpoint moved CPU -> CUDA -> CPU
  determinism   the same runs without the CUDA determinism settings: what is exact without them
  background    benchmarks/background_save.py on the GPU: the stall per periodic checkpoint
                against a device-to-host copy into reused pinned buffers (goal <= 1.25x)
  sigterm       SIGTERM to a durable checkpoint for a --gb GB state in GPU memory, against a raw
                write + fsync of the same bytes
Writes DIR/gpu_report.txt and DIR/gpu_report.json (DIR: $OUT, else ./gpu-report). Without a CUDA
device it says "no CUDA device" and exits 0; otherwise it exits 1 when a check failed.
`--device cpu` runs the same sections on the CPU (tests/unit/test_gpu_kit.py): a check of the kit itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from tools.train_process import run_signalled

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "tests", "determinism", "sigterm", "background")


class Report:
    """Text and JSON, rewritten after every section, so that a run cut short still leaves its part."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.sections: dict[str, dict[str, Any]] = {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, ok: bool, lines: list[str], figures: dict[str, Any] | None = None) -> None:
        self.sections[name] = {"ok": ok, "lines": lines, "figures": figures or {}}
        text = []
        for section, entry in self.sections.items():
            text.append(f"== {section}: {'ok' if entry['ok'] else 'FAILED'}")
            text += [f"   {line}" for line in entry["lines"]]
        (self.out / "gpu_report.txt").write_text("\n".join(text) + "\n")
        (self.out / "gpu_report.json").write_text(json.dumps(self.sections, indent=1) + "\n")
        print(f"== {name}: {'ok' if ok else 'FAILED'}", *(f"   {line}" for line in lines), sep="\n", flush=True)


def run_capture(cmd: list[str], timeout: float, **kw: Any) -> tuple[int, str]:
    """Run `cmd` from the repository root; (exit code, stdout+stderr). 124 when it ran out of time."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(ran out of its {timeout:.0f} s)"
    return done.returncode, done.stdout + done.stderr


def declared_torch_range() -> str:
    """The torch requirement of the installed package, else of pyproject.toml."""
    try:
        requires = metadata.requires("hydra_preempt") or []
    except metadata.PackageNotFoundError:
        requires = re.findall(r'"(torch[^"]*)"', (ROOT / "pyproject.toml").read_text())
    return next((r for r in requires if re.match(r"torch\b", r) and "extra" not in r), "torch")


def environment(args: argparse.Namespace) -> tuple[bool, list[str], dict[str, Any]]:
    import torch
    from packaging.requirements import Requirement

    spec = declared_torch_range()
    version = torch.__version__.split("+")[0]
    in_range = Requirement(spec).specifier.contains(version, prereleases=True)
    gpu = torch.cuda.get_device_properties(0) if args.device == "cuda" else None
    figures = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu.name if gpu else "none (--device cpu)",
        "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else 0,
        "torch_declared": spec,
        "torch_in_range": in_range,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        figures["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as e:  # reported, and the tests section checks NVML for real
        figures["driver"] = f"unknown ({type(e).__name__}: {e})"
    lines = [
        f"Python {figures['python']}, torch {figures['torch']} (CUDA {figures['cuda']}), "
        f"{figures['gpu']} {figures['gpu_memory_gib']} GiB, driver {figures['driver']}",
        f"declared {spec}: torch {version} is {'inside' if in_range else 'OUTSIDE'} it",
        f"checkpoints written to {args.scratch}: {filesystem(args.scratch)}",
    ]
    return in_range, lines, figures


def filesystem(path: Path) -> str:
    """The file system type and free space of `path` (a tmpfs would make disk figures memory figures)."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines() if len(line.split()) > 2]
    best = max((m for m in mounts if str(path.resolve()).startswith(m[1])), key=lambda m: len(m[1]), default=None)
    free = shutil.disk_usage(path).free / 1e9
    return f"{best[2] if best else 'unknown'} at {best[1] if best else '?'}, {free:.0f} GB free"


def tests(args: argparse.Namespace) -> tuple[bool, list[str], dict[str, Any]]:
    if args.device != "cuda":
        return True, ["not run with --device cpu: every test of tests/cuda needs a GPU"], {}
    xml = args.scratch / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/cuda", "-m", "cuda", "-n", "0", "-p", "no:cacheprovider"]
    code, out = run_capture([*cmd, "-q", "-rA", f"--junitxml={xml}"], timeout=args.section_s)
    (args.out / "cuda-tests.log").write_text(out)
    verdicts: dict[str, str] = {}
    lines: list[str] = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            verdict, why = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    verdict = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[child.tag]
                    why = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
            verdicts[str(case.get("name"))] = verdict
            lines.append(f"{verdict:8s} {case.get('name')} ({float(case.get('time', 0)):.1f} s) {why}".rstrip())
    else:
        lines.append(f"pytest wrote no results (exit {code}); see cuda-tests.log")
    passed = code == 0 and bool(verdicts) and all(v == "passed" for v in verdicts.values())
    return passed, lines, {"exit_code": code, "tests": verdicts}


def worker(
    args: argparse.Namespace, run_dir: Path, steps: int, *flags: str, stop_at: int | None = None
) -> tuple[int, str | None]:
    """tests/cuda/cuda_worker.py; with `stop_at`, SIGTERM at that step. (exit code, parameter hash)."""
    out = run_dir.with_suffix(".json")
    cmd = [sys.executable, "-m", "tests.cuda.cuda_worker", str(run_dir), str(steps), str(out), *flags]
    cmd += ["--device", args.device]
    code, _ = run_signalled(cmd, stop_at, ROOT)
    return code, json.loads(out.read_text())["sha256"] if out.exists() else None


def determinism(args: argparse.Namespace) -> tuple[bool, list[str], dict[str, Any]]:
    """Without CUBLAS_WORKSPACE_CONFIG and use_deterministic_algorithms: is a run even repeatable?"""
    steps, flag, base = args.steps, "--no-determinism", args.scratch / "determinism"
    _, first = worker(args, base / "first", steps, flag)
    _, second = worker(args, base / "second", steps, flag)
    codes = [worker(args, base / "stopped", steps, flag, stop_at=s)[0] for s in (steps // 3, 2 * steps // 3)]
    code, resumed = worker(args, base / "stopped", steps, flag)
    ran = first is not None and second is not None and resumed is not None and codes == [75, 75] and code == 0
    figures = {"repeatable": first == second, "resume_exact": resumed == first, "ran": ran}
    lines = [
        "without the determinism settings (this model: Linear, GELU, Dropout, AdamW):",
        f"two uninterrupted runs are {'identical' if first == second else 'DIFFERENT'}; "
        f"a run stopped twice by SIGTERM ends {'identical to' if resumed == first else 'DIFFERENT from'} them",
        "(identical here says nothing of other kernels: atomics in scatter/index_add, cuDNN autotuning and "
        "split-K matmuls may differ run to run; the README's settings make them exact or raise)",
    ]
    return ran, lines, figures


def background(args: argparse.Namespace) -> tuple[bool, list[str], dict[str, Any]]:
    cmd = [sys.executable, "benchmarks/background_save.py", "--device", args.device, "--gb", str(args.gb)]
    cmd += ["--steps", "31", "--every", "10", "--rounds", "1", "--no-dcp", "--dir", str(args.scratch)]
    code, out = run_capture(cmd, timeout=args.section_s)
    lines = [line for line in out.splitlines() if line.strip()][-10:]
    ratio = re.search(r"copy into reused buffers: ([\d.]+)", out)
    figures = {"exit_code": code, "stall_over_copy": float(ratio.group(1)) if ratio else None, "output": out[-4000:]}
    return code == 0, lines, figures


SIGTERM_CHILD = """
import sys, time, torch
sys.path.insert(0, "benchmarks")
from background_save import build
from hydra_preempt import SessionConfig, run
device = sys.argv[3]
model, optimizer, x = build(float(sys.argv[2]), device)
def train(session):
    session.register(model=model, optimizer=optimizer)
    session.restore()
    for step in session.steps(10**9):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"step {step + 1}", flush=True)
config = SessionConfig.from_mapping({"checkpoint": {"every_steps": 10**9}, "divergence": {"enabled": False},
                                     "watchdog": {"enabled": False}})
outcome = run(train, sys.argv[1], config)
print(outcome.exit_code, outcome.message, flush=True)
sys.exit(int(outcome.exit_code))
"""


def sigterm(args: argparse.Namespace) -> tuple[bool, list[str], dict[str, Any]]:
    run_dir = args.scratch / "sigterm"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, str(run_dir), str(args.gb), args.device],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    signalled, tail = 0.0, list[str]()
    for line in proc.stdout:
        tail = [*tail[-10:], line.rstrip()]
        if not signalled and line.strip() == "step 3":
            proc.send_signal(signal.SIGTERM)
            signalled = time.perf_counter()
    code = proc.wait()
    stop_s = time.perf_counter() - signalled if signalled else float("nan")
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    nbytes = sum(f.stat().st_size for f in saved[-1].iterdir()) if saved else 0
    raw_s = raw_write(args.scratch / "raw.bin", nbytes) if nbytes else float("nan")
    shutil.rmtree(run_dir, ignore_errors=True)
    ok = code == 75 and bool(saved)
    figures = {"exit_code": code, "bytes": nbytes, "sigterm_to_exit_s": stop_s, "raw_write_s": raw_s}
    lines = [
        f"state {nbytes / 1e9:.2f} GB in {'GPU' if args.device == 'cuda' else 'host'} memory: SIGTERM to exit {code} with a durable checkpoint in "
        f"{stop_s:.1f} s ({nbytes / 1e9 / stop_s:.2f} GB/s)",
        f"raw write + fsync of the same bytes from host memory: {raw_s:.1f} s ({nbytes / 1e9 / raw_s:.2f} GB/s); "
        f"ratio {stop_s / raw_s:.2f}",
    ]
    if not ok:
        lines += tail
    return ok, lines, figures


def raw_write(path: Path, nbytes: int, chunk: int = 256 << 20) -> float:
    """Seconds to write and fsync `nbytes` from one reused host buffer: the disk's floor."""
    buffer = memoryview(os.urandom(1 << 20) * (chunk >> 20))
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left:
            left -= f.write(buffer[: min(chunk, left)])
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


CHECKS: dict[str, Callable[[argparse.Namespace], tuple[bool, list[str], dict[str, Any]]]] = {
    "environment": environment,
    "tests": tests,
    "determinism": determinism,
    "background": background,
    "sigterm": sigterm,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-report"))
    parser.add_argument("--gb", type=float, default=10.0, help="state size of the background and sigterm sections")
    parser.add_argument("--steps", type=int, default=300, help="run length of the determinism section (>= 3)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--section-s", type=float, default=240.0, help="time limit of one section's subprocess")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a check of the kit itself")
    parser.add_argument("--scratch", type=Path, default=None, help="where checkpoints go (default: a temporary dir)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        print(f"gpu_kit: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    report = Report(args.out)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        report.add("environment", True, [f"no CUDA device (torch {torch.__version__}): nothing to check here"])
        return 0
    args.scratch = Path(tempfile.mkdtemp(prefix="gpu-kit-", dir=args.scratch))
    try:
        for name in chosen:
            started = time.perf_counter()
            try:
                ok, lines, figures = CHECKS[name](args)
            except Exception as e:  # one broken section must not hide the others' results
                ok, lines, figures = False, [f"{type(e).__name__}: {e}"], {}
            figures["seconds"] = round(time.perf_counter() - started, 1)
            report.add(name, ok, lines, figures)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    failed = [name for name, entry in report.sections.items() if not entry["ok"]]
    print(f"gpu_kit: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}; report in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
