"""GPU figures through NVML (nvidia-ml-py's `pynvml`): readings of every visible GPU, and a sampler
that writes them into the run directory while a run trains.

The NVML module is passed in (`load_nvml` finds the real one), so the reading is tested with a
stand-in object and no GPU.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .fsutil import open_append

log = logging.getLogger("hydra_preempt")


class NvmlUnavailable(Exception):
    """No NVML here: the library is not installed, or no driver / no GPU answers."""


def load_nvml() -> Any:
    """The initialised `pynvml` module. Raises NvmlUnavailable with the reason."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        raise NvmlUnavailable("pynvml (nvidia-ml-py) is not installed") from None
    try:
        nvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: NVML's own words
        raise NvmlUnavailable(f"NVML does not answer: {e}") from None
    return nvml


def visible_indices(count: int, env: dict[str, str] | None = None) -> list[int]:
    """The NVML indices this process may use: CUDA_VISIBLE_DEVICES when it lists integers, else all."""
    listed = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(count))
    if not listed.strip():  # set but empty: CUDA sees no GPU
        return []
    indices = []
    for item in listed.split(","):
        item = item.strip()
        if not item.isdigit():  # UUIDs or MIG names: NVML's order is not CUDA's, so take them all
            return list(range(count))
        if int(item) < count:
            indices.append(int(item))
    return indices


def read_gpus(nvml: Any, indices: list[int] | None = None) -> list[dict[str, Any]]:
    """One reading per GPU: memory used/total (MiB), utilization (%), temperature (C), power (W)."""
    if indices is None:
        indices = visible_indices(nvml.nvmlDeviceGetCount())
    readings = []
    for index in indices:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        readings.append(
            {
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_used_mib": round(memory.used / 2**20, 1),
                "memory_total_mib": round(memory.total / 2**20, 1),
                "utilization_pct": float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                "temperature_c": float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                "power_w": round(nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, 1),  # NVML gives milliwatts
            }
        )
    return readings


GPU_METRICS_FILE = "gpu_metrics.jsonl"  # in the run directory: one line per sample


class GpuSummary:
    """Per GPU, over the readings it was given: peak and total memory, mean utilization, peak
    temperature, mean power, and how many readings. Pure: fed by the sampler as it samples (for
    each checkpoint's manifest) and by `summarize` from a file (for `hydra-preempt status`)."""

    def __init__(self) -> None:
        self._per_gpu: dict[int, dict[str, Any]] = {}

    def add(self, readings: list[dict[str, Any]]) -> None:
        for r in readings:
            s = self._per_gpu.setdefault(
                int(r["index"]),
                {"name": "", "samples": 0, "peak_memory_mib": 0.0, "memory_total_mib": 0.0, "peak_temperature_c": None,
                 "utilization": 0.0, "power": 0.0},
            )  # fmt: skip
            s["name"] = str(r.get("name", s["name"]))[:200]
            s["samples"] += 1
            s["peak_memory_mib"] = max(s["peak_memory_mib"], float(r["memory_used_mib"]))
            s["memory_total_mib"] = max(s["memory_total_mib"], float(r.get("memory_total_mib", 0.0)))
            s["utilization"] += float(r["utilization_pct"])
            s["power"] += float(r.get("power_w", 0.0))
            if "temperature_c" in r:
                s["peak_temperature_c"] = max(s["peak_temperature_c"] or 0.0, float(r["temperature_c"]))

    def as_dict(self) -> dict[str, dict[str, Any]] | None:
        """{"<index>": {...}} by NVML index (JSON keys), None without readings; every figure finite."""
        if not self._per_gpu:
            return None
        summary = {}
        for index, s in sorted(self._per_gpu.items()):
            n = s["samples"]
            figures = {
                "samples": n,
                "peak_memory_mib": round(s["peak_memory_mib"], 1),
                "memory_total_mib": round(s["memory_total_mib"], 1),
                "mean_utilization_pct": round(s["utilization"] / n, 1),
                "peak_temperature_c": s["peak_temperature_c"],
                "mean_power_w": round(s["power"] / n, 1),
            }
            summary[str(index)] = {"name": s["name"]} | {
                k: v for k, v in figures.items() if v is not None and math.isfinite(v)
            }
        return summary


def has_nvidia_device(dev: Path = Path("/dev")) -> bool:
    """Whether an NVIDIA GPU's device node is there (/dev/nvidia0, ...; a container gets them too)."""
    return any(p.name[len("nvidia") :].isdecimal() for p in dev.glob("nvidia*"))


class GpuSampler:
    """Samples every visible GPU each `every_s` seconds into a JSON-lines file, from a daemon thread,
    and keeps a running summary of the readings (`summary`, for each checkpoint's manifest).

    Without NVML (no library, no driver) `start` logs one line where a GPU's device node exists,
    none where there is no GPU, and does nothing else. A
    failure while sampling stops the sampling (one warning), never the training.
    """

    def __init__(
        self,
        path: Path,
        every_s: float,
        nvml_loader: Callable[[], Any] = load_nvml,
        gpu_present: Callable[[], bool] = has_nvidia_device,
    ) -> None:
        self.path = Path(path)
        self.every_s = every_s
        self._load = nvml_loader
        self._gpu_present = gpu_present
        self._nvml: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._summary = GpuSummary()
        self._summary_lock = threading.Lock()  # the sampler thread adds; a checkpoint's writer reads

    def start(self) -> bool:
        try:
            nvml = self._load()
        except NvmlUnavailable as e:
            # a machine without an NVIDIA GPU has nothing to measure: no word; one with a GPU is told why
            log.log(logging.INFO if self._gpu_present() else logging.DEBUG, "GPU metrics are off: %s", e)
            return False
        indices = visible_indices(nvml.nvmlDeviceGetCount())
        if not indices:
            log.info("GPU metrics are off: NVML answers but no GPU is visible")
            nvml.nvmlShutdown()
            return False
        self._nvml = nvml
        self._thread = threading.Thread(target=self._loop, args=(indices,), name="gpu-metrics", daemon=True)
        self._thread.start()
        return True

    def summary(self) -> dict[str, dict[str, Any]] | None:
        """The summary of this process's readings so far; None before the first (or without NVML)."""
        with self._summary_lock:
            return self._summary.as_dict()

    def _loop(self, indices: list[int]) -> None:
        try:
            with open_append(self.path) as out:
                while True:
                    readings = read_gpus(self._nvml, indices)
                    out.write(json.dumps({"time": round(time.time(), 3), "gpus": readings}) + "\n")
                    out.flush()
                    with self._summary_lock:
                        self._summary.add(readings)
                    if self._stop.wait(self.every_s):
                        return
        except Exception as e:  # NVML's errors or the disk's: the run goes on without GPU metrics
            log.warning("GPU metrics stopped: %s", e)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        try:
            self._nvml.nvmlShutdown()
        except Exception as e:  # the driver went away: nothing left to release
            log.debug("nvmlShutdown: %s", e)


def summarize(path: Path) -> dict[str, dict[str, Any]] | None:
    """The GpuSummary of a gpu_metrics.jsonl (every run of the directory); None without samples."""
    summary = GpuSummary()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            summary.add(json.loads(line)["gpus"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill, or not a sampler's
    return summary.as_dict()
