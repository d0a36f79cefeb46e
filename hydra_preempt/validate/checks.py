"""`hydra-preempt validate`: does the protocol hold on this machine, with this checkpoint directory?

Every check is real: child processes (worker.py) are killed during saves, sent TERM,
USR1 and INT, resumed and compared bit for bit; two ranks reduce over gloo; the checkpoint
directory's save, load and raw write throughput are measured. Each check gives one Row
(PASS / FAIL / SKIP, the reason, its figures); the command exits 0 only if none failed.

The checks that use the checkpoint directory (atomicity, retention, throughput, grace fit) run in
a subdirectory of it that is removed afterwards; the signal and resume runs use a scratch
directory of their own, as they check the session's protocol rather than the disk.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import HydraPreemptError
from ..fsutil import create_file
from ..outcome import ExitCode

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
SAMPLE_BYTES = 256 << 20  # the state measured for throughput, unless --state-gb is smaller
_WAIT_S = 180.0  # the longest wait for one child's line: a start-up (torch import) on a crowded machine


@dataclass
class Row:
    name: str
    status: str  # PASS, FAIL or SKIP
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


# -- pure logic -------------------------------------------------------------
def exit_code(rows: list[Row]) -> int:
    return ExitCode.FAILED if any(r.status == FAIL for r in rows) else ExitCode.FINISHED


def format_rows(rows: list[Row]) -> str:
    width = max((len(r.name) for r in rows), default=0)
    return "\n".join(f"{r.status}  {r.name.ljust(width)}  {r.reason}" for r in rows)


def pick_grace(qos_lines: str, qos: str | None) -> tuple[str, float] | None:
    """`sacctmgr -n -P show qos format=Name,GraceTime` -> (QoS, GraceTime s) of `qos`, or, without one,
    of the QoS with the shortest non-zero GraceTime (the preemptible one: the tightest budget)."""
    from ..slurm.commands import parse_duration

    graces: dict[str, float | None] = {}
    for line in qos_lines.splitlines():
        name, _, grace = line.strip().partition("|")
        if name:
            graces[name] = parse_duration(grace) if ":" in grace else _seconds(grace)
    if qos is not None:
        value = graces.get(qos)
        return (qos, value) if value is not None else None
    preemptible = [(v, n) for n, v in graces.items() if v]
    return (min(preemptible)[1], min(preemptible)[0]) if preemptible else None


def _seconds(text: str) -> float | None:
    """'120' -> 120.0, '' -> 0.0; anything else (not a number SLURM would print) -> None."""
    try:
        return float(text or 0)
    except ValueError:
        return None


def grace_fit(state_gb: float | None, save_gbps: float, grace: tuple[str, float] | None, why_unknown: str) -> Row:
    """Whether a save of `state_gb` at the measured rate fits the grace period."""
    name = "grace period fit"
    if state_gb is None:
        return Row(name, SKIP, "give --state-gb (your model's state in GB) to predict its save time")
    seconds = state_gb / save_gbps
    figures: dict[str, Any] = {"state_gb": state_gb, "predicted_save_s": round(seconds, 1)}
    said = f"a {state_gb:g} GB state takes about {seconds:.0f} s to save here"
    if grace is None:
        return Row(name, SKIP, f"{said}; the grace period is unknown ({why_unknown})", figures)
    qos, grace_s = grace
    figures.update(qos=qos, grace_s=grace_s)
    if seconds <= grace_s:
        return Row(name, PASS, f"{said}; GraceTime of QoS {qos} is {grace_s:.0f} s: it fits", figures)
    return Row(
        name,
        FAIL,
        f"{said}; GraceTime of QoS {qos} is {grace_s:.0f} s: it will not fit (use checkpoint.async_save / "
        "sharded saves / a faster checkpoint.dir / a longer GraceTime)",
        figures,
    )


# -- child processes --------------------------------------------------------
class Child:
    """A validate.worker process whose output lines are awaited one pattern at a time."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hydra_preempt.validate.worker", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = _WAIT_S) -> re.Match[str]:
        """The first new line matching `pattern`. Raises CheckFailed if the child ends or is too slow."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise CheckFailed(f"no line matching {pattern!r} within {timeout:.0f} s: {self.tail()}") from None
            if line is None:
                self._queue.put(None)  # stays ended for later waits
                raise CheckFailed(f"the child ended (exit {self.proc.wait()}) before {pattern!r}: {self.tail()}")
            self.lines.append(line)
            if m := regex.search(line):
                return m

    def all_lines(self, timeout: float = _WAIT_S) -> list[str]:
        """Every line the child wrote, also those no wait_for() had reached yet: until it ended, or for
        at most `timeout` seconds (0: those the pump has read by now)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return self.lines
            if line is None:
                self._queue.put(None)
                return self.lines
            self.lines.append(line)

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = _WAIT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CheckFailed(f"the child did not exit within {timeout:.0f} s") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self) -> str:
        return " | ".join(self.all_lines(timeout=0)[-3:]) or "no output"  # whatever the pump has read by now


class CheckFailed(Exception):
    """A check's FAIL reason."""


def _guard(name: str, check: Callable[[], Row]) -> Row:
    """A check that raised is a FAIL row with the reason, never a traceback."""
    try:
        return check()
    except Exception as e:
        return Row(name, FAIL, _reason(e))


def _reason(e: Exception) -> str:
    """A FAIL row's reason: the library's own messages as they are, anything else with its type."""
    return str(e) if isinstance(e, (CheckFailed, HydraPreemptError)) else f"{type(e).__name__}: {e}"


# -- checks on the checkpoint directory -------------------------------------
def check_atomicity(directory: Path) -> Row:
    """SIGKILL a process in the middle of a save; the previous checkpoint must load and verify."""
    from ..checkpoint.store import CheckpointStore

    child = Child("save-loop", str(directory), "32")
    try:
        child.wait_for(r"^saving 2$")
        started = time.monotonic()
        child.wait_for(r"^saved 2$")
        save_s = time.monotonic() - started
        child.wait_for(r"^saving (\d+)$")
        time.sleep(save_s / 3)  # inside the save, by the last one's duration
        child.proc.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
    # The step the kill met is the last one the child said it was saving: under load this reader lags
    # behind the child, which may be several saves further on than the line awaited above.
    step = max(int(m[1]) for line in child.all_lines() if (m := re.match(r"^saving (\d+)$", line)))
    half_written = sorted(p.name for p in directory.glob(".tmp-step-*"))
    store = CheckpointStore(directory)
    store.prepare()  # what a restart does: the half-written save is removed
    loaded = store.load_latest()
    figures = {"killed_during_step": step, "save_s": round(save_s, 3), "half_written": half_written}
    if loaded is None:
        return Row("checkpoint atomicity", FAIL, f"killed during the save of step {step}: no checkpoint loads", figures)
    info, tree = loaded
    figures["loaded_step"] = info.step
    if info.step not in (step - 1, step) or tree["step"] != info.step or not bool((tree["w"] == info.step).all()):
        return Row(
            "checkpoint atomicity", FAIL, f"killed during step {step}: step {info.step} has wrong contents", figures
        )
    when = "mid-save (a half-written temporary was left)" if half_written else "around a save (none half-written)"
    return Row(
        "checkpoint atomicity",
        PASS,
        f"SIGKILL {when} of step {step}: step {info.step} loads and verifies",
        figures,
    )


def check_retention(directory: Path) -> Row:
    """keep_last=2, keep_best=1 by loss: six saves leave the best and the last two."""
    import torch

    from ..checkpoint.retention import RetentionPolicy
    from ..checkpoint.store import CheckpointStore
    from ..checkpoint.writer import Snapshot

    store = CheckpointStore(directory, RetentionPolicy(keep_last=2, keep_best=1, metric="loss"))
    store.prepare()
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 7.0}
    for step, loss in losses.items():
        store.save(Snapshot.capture({"w": torch.full((1000,), float(step))}), step, "periodic", {"loss": loss})
    kept = [info.step for info in store.complete()]
    figures = {"losses": losses, "kept": kept}
    if kept != [2, 5, 6]:
        return Row("retention", FAIL, f"keep_last=2 keep_best=1 kept steps {kept}, expected [2, 5, 6]", figures)
    return Row("retention", PASS, "keep_last=2 keep_best=1 (min loss) kept steps 2 (best), 5, 6 of 1..6", figures)


def measure_throughput(directory: Path, nbytes: int) -> tuple[list[Row], float]:
    """Save and load a state of `nbytes` through the store; write as many raw bytes with fsync."""
    import torch

    from ..checkpoint.retention import RetentionPolicy
    from ..checkpoint.store import CheckpointStore
    from ..checkpoint.writer import Snapshot

    weights = torch.arange(nbytes // 4, dtype=torch.float32)  # not zeros: no file system may shortcut them
    store = CheckpointStore(directory / "store", RetentionPolicy(keep_last=1))
    store.prepare()
    started = time.monotonic()
    info = store.save(Snapshot.capture({"w": weights}), 1, "manual")
    save_s = time.monotonic() - started
    started = time.monotonic()
    tree = store.load(info)
    load_s = time.monotonic() - started
    if not torch.equal(tree["w"], weights):
        raise CheckFailed("the state read back differs from the one saved")
    del tree
    raw = directory / "raw.bin"
    data = weights.numpy().data.cast("B")
    started = time.monotonic()
    with create_file(raw) as f:
        for offset in range(0, nbytes, 64 << 20):
            f.write(data[offset : offset + (64 << 20)])
        f.flush()
        os.fsync(f.fileno())
    raw_s = time.monotonic() - started
    raw.unlink()
    gb = nbytes / 1e9
    save_gbps, load_gbps, raw_gbps = gb / save_s, gb / load_s, gb / raw_s
    rows = [
        Row(
            "throughput: raw disk",
            PASS,
            f"{raw_gbps:.2f} GB/s write+fsync of {gb:.2f} GB in {directory}",
            {"gb": round(gb, 3), "raw_write_gbps": round(raw_gbps, 3)},
        ),
        Row(
            "throughput: save",
            PASS,
            f"{save_gbps:.2f} GB/s ({save_gbps / raw_gbps:.0%} of the raw disk), {gb:.2f} GB in {save_s:.2f} s",
            {"save_gbps": round(save_gbps, 3), "save_s": round(save_s, 3)},
        ),
        Row(
            "throughput: load",
            PASS,
            f"{load_gbps:.2f} GB/s verified read (the page cache may still hold it: an upper bound)",
            {"load_gbps": round(load_gbps, 3), "load_s": round(load_s, 3)},
        ),
    ]
    return rows, save_gbps


DISK_ROWS = ("checkpoint atomicity", "retention", "throughput: raw disk", "throughput: save", "throughput: load")


def usable_dir(directory: Path) -> str | None:
    """Why `directory` cannot hold checkpoints, or None if a file can be created, written and removed there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe.{secrets.token_hex(8)}"
        with create_file(probe) as f:
            f.write(b"probe")
        probe.unlink()
    except OSError as e:
        return f"checkpoint directory {directory} is not usable: {e.strerror or e}"
    return None


# -- checks of the session's protocol ---------------------------------------
def _checkpoint_steps(run_dir: Path, reason: str) -> list[int]:
    from ..checkpoint.layout import complete_checkpoints

    return [i.step for i in complete_checkpoints(run_dir / "checkpoints") if i.reason == reason]


def _last_stop(run_dir: Path) -> dict[str, Any]:
    from ..rundir import read_events

    stops = [e for e in read_events(run_dir) if e["event"] == "stop"]
    return stops[-1] if stops else {}


def check_signals_and_resume(scratch: Path, steps: int = 60) -> list[Row]:
    """USR1 saves and training goes on; TERM saves and exits 75; resumed, the run ends with the
    parameters of one never stopped (the manual save on the way included)."""
    from ..rundir import read_result

    run_dir = scratch / "usr1-term"
    reference = Child("train", str(scratch / "reference"), str(steps), "0")
    # Slow steps: under load the parent must still signal it long before its 60 steps are done
    child = Child("train", str(run_dir), str(steps), "0.1")
    try:
        child.wait_for(r"^step 5$")
        child.send(signal.SIGUSR1)
        deadline = time.monotonic() + _WAIT_S
        while not (manual := _checkpoint_steps(run_dir, "manual")):
            if time.monotonic() > deadline or child.proc.poll() is not None:
                raise CheckFailed(f"no manual checkpoint after SIGUSR1: {child.tail()}")
            time.sleep(0.05)
        child.wait_for(rf"^step {manual[0] + 3}$")  # it went on training after the save
        usr1 = Row("signal USR1", PASS, f"manual checkpoint at step {manual[0]}, training went on", {"step": manual[0]})
        child.send(signal.SIGTERM)
        rc = child.wait()
        stop = _last_stop(run_dir)
        figures = {"exit_code": rc, "stop_step": stop.get("step"), "checkpoint_step": stop.get("checkpoint_step")}
        if rc != 75 or stop.get("checkpoint_step") is None or stop.get("checkpoint_step") != stop.get("step"):
            term = Row("signal TERM", FAIL, f"expected exit 75 and a checkpoint at the stop step: {figures}", figures)
            return [usr1, term, Row("exact resume", FAIL, "not tried: the TERM stop failed")]
        term = Row("signal TERM", PASS, f"exit 75, checkpoint at the stop step {stop['step']}", figures)
        resumed = Child("train", str(run_dir), str(steps), "0")
        try:
            codes = (resumed.wait(), reference.wait())
        finally:
            resumed.kill()
    finally:
        reference.kill()
        child.kill()
    if codes != (0, 0):
        return [usr1, term, Row("exact resume", FAIL, f"exit codes: resumed {codes[0]}, uninterrupted {codes[1]}")]
    a, b = read_result(scratch / "reference") or {}, read_result(run_dir) or {}
    figures = {"steps": steps, "resumed_from": stop["step"], "sha256": b.get("params_sha256")}
    if stop["step"] >= steps or not a.get("params_sha256") or a.get("params_sha256") != b.get("params_sha256"):
        resume = Row("exact resume", FAIL, f"parameters differ after resuming from step {stop['step']}", figures)
    else:
        resume = Row(
            "exact resume", PASS, f"resumed from step {stop['step']}: same parameter hash after {steps}", figures
        )
    return [usr1, term, resume]


def check_int(run_dir: Path) -> Row:
    child = Child("train", str(run_dir), "1000000", "0.01")
    try:
        child.wait_for(r"^step 5$")
        child.send(signal.SIGINT)
        rc = child.wait()
    finally:
        child.kill()
    stop = _last_stop(run_dir)
    figures = {"exit_code": rc, "stop_step": stop.get("step"), "checkpoint_step": stop.get("checkpoint_step")}
    if rc != 130 or stop.get("checkpoint_step") != stop.get("step"):
        return Row("signal INT", FAIL, f"expected exit 130 and a checkpoint at the stop step: {figures}", figures)
    return Row("signal INT", PASS, f"exit 130, checkpoint at the stop step {stop['step']}", figures)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_allreduce(backend: str, world_size: int) -> Row:
    name = f"distributed {backend}"
    port = str(_free_port())
    ranks = [Child("allreduce", backend, str(r), str(world_size), port) for r in range(world_size)]
    try:
        sums = [float(c.wait_for(r"^sum (\S+)$")[1]) for c in ranks]
        codes = [c.wait() for c in ranks]
    finally:
        for c in ranks:
            c.kill()
    expected = world_size * (world_size + 1) / 2
    figures = {"world_size": world_size, "sums": sums, "exit_codes": codes}
    if any(s != expected for s in sums) or any(codes):
        return Row(name, FAIL, f"all_reduce over {world_size} ranks gave {sums}, expected {expected:g}", figures)
    return Row(name, PASS, f"all_reduce over {world_size} ranks on 127.0.0.1 gave {expected:g} on every rank", figures)


def check_nccl() -> Row:
    import torch

    if not torch.cuda.is_available():
        return Row("distributed nccl", SKIP, "no CUDA GPU visible (torch.cuda.is_available() is False)")
    return check_allreduce("nccl", min(2, torch.cuda.device_count()))


def check_gpu_metrics() -> Row:
    from ..gpumetrics import NvmlUnavailable, load_nvml, read_gpus

    try:
        nvml = load_nvml()
    except NvmlUnavailable as e:
        return Row("GPU metrics (NVML)", SKIP, str(e))
    try:
        gpus = read_gpus(nvml)
    finally:
        nvml.nvmlShutdown()
    if not gpus:
        return Row("GPU metrics (NVML)", SKIP, "NVML answers but no GPU is visible")
    said = "; ".join(
        f"{g['index']} {g['name']}: {g['memory_used_mib']:.0f}/{g['memory_total_mib']:.0f} MiB, "
        f"{g['utilization_pct']:.0f}%, {g['temperature_c']:.0f} C, {g['power_w']:.0f} W"
        for g in gpus
    )
    return Row("GPU metrics (NVML)", PASS, said, {"gpus": gpus})


def grace_period(qos: str | None) -> tuple[tuple[str, float] | None, str]:
    """(QoS, GraceTime) from the accounting database, or None and why it is unknown."""
    from ..slurm.commands import SlurmError, slurm_command

    if shutil.which("sacctmgr") is None:
        return None, "SLURM is not installed here"
    try:
        text = slurm_command(["sacctmgr", "-n", "-P", "show", "qos", "format=Name,GraceTime"], timeout=10)
    except SlurmError as e:
        return None, f"SLURM does not answer: {e}"
    found = pick_grace(text, qos)
    if found is None:
        return None, f"no QoS {qos!r}" if qos else "no QoS has a GraceTime"
    return found, ""


# -- the command ------------------------------------------------------------
def validate(checkpoint_dir: Path | None, state_gb: float | None, qos: str | None = None) -> list[Row]:
    """Run every check; rows in a fixed order."""
    scratch = Path(tempfile.mkdtemp(prefix="hydra-preempt-validate-"))
    base = checkpoint_dir if checkpoint_dir is not None else scratch / "checkpoints"
    work = base / f"validate-{os.getpid()}"
    try:
        unusable = usable_dir(work)
        with ThreadPoolExecutor(max_workers=6) as pool:
            # The processes' checks run side by side; throughput is measured alone afterwards.
            names = ("signal USR1", "signal TERM", "exact resume")
            signals = pool.submit(_guard_many, names, check_signals_and_resume, scratch)
            sigint = pool.submit(_guard, "signal INT", lambda: check_int(scratch / "int"))
            gloo = pool.submit(_guard, "distributed gloo", lambda: check_allreduce("gloo", 2))
            nccl = pool.submit(_guard, "distributed nccl", check_nccl)
            grace = pool.submit(grace_period, qos)
            if unusable is None:
                atomic = _guard("checkpoint atomicity", lambda: check_atomicity(work / "atomicity"))
            rows = [*signals.result(), sigint.result(), gloo.result(), nccl.result()]
            found, why_unknown = grace.result()
        rows.append(_guard("GPU metrics (NVML)", check_gpu_metrics))
        if unusable is not None:
            disk = [Row(name, FAIL, unusable) for name in DISK_ROWS]
            fit = Row("grace period fit", FAIL, f"no save throughput measured: {unusable}")
        else:
            retention = _guard("retention", lambda: check_retention(work / "retention"))
            nbytes = SAMPLE_BYTES if state_gb is None else min(SAMPLE_BYTES, max(1 << 20, int(state_gb * 1e9)))
            try:
                throughput, save_gbps = measure_throughput(work / "throughput", nbytes)
                fit = grace_fit(state_gb, save_gbps, found, why_unknown)
            except Exception as e:  # a full disk (CheckpointWriteError) included: a row, never a traceback
                reason = _reason(e)
                throughput = [Row(name, FAIL, reason) for name in DISK_ROWS[2:]]
                fit = Row("grace period fit", FAIL, f"no save throughput measured: {reason}")
            disk = [atomic, retention, *throughput]
        return [*disk, fit, *rows]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _guard_many(names: tuple[str, ...], check: Callable[[Path], list[Row]], run_dir: Path) -> list[Row]:
    try:
        return check(run_dir)
    except Exception as e:
        return [Row(name, FAIL, _reason(e)) for name in names]
