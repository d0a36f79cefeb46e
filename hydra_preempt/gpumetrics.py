"""GPU figures through NVML (nvidia-ml-py's `pynvml`): readings of every visible GPU, and a sampler
that writes them into the run directory while a run trains.

The NVML module is passed in (`load_nvml` finds the real one), so the reading is tested with a
stand-in object and no GPU.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

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


class GpuSampler:
    """Samples every visible GPU each `every_s` seconds into a JSON-lines file, from a daemon thread.

    Without NVML (no library, no driver, no GPU) `start` logs one line and does nothing else. A
    failure while sampling stops the sampling (one warning), never the training.
    """

    def __init__(self, path: Path, every_s: float, nvml_loader: Callable[[], Any] = load_nvml) -> None:
        self.path = Path(path)
        self.every_s = every_s
        self._load = nvml_loader
        self._nvml: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        try:
            nvml = self._load()
        except NvmlUnavailable as e:
            log.info("GPU metrics are off: %s", e)
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

    def _loop(self, indices: list[int]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as out:
                while True:
                    out.write(
                        json.dumps({"time": round(time.time(), 3), "gpus": read_gpus(self._nvml, indices)}) + "\n"
                    )
                    out.flush()
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


def summarize(path: Path) -> dict[str, Any] | None:
    """Peak memory used and mean utilization per GPU over a gpu_metrics.jsonl; None without samples."""
    per_gpu: dict[int, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            sample = json.loads(line)
            gpus = sample["gpus"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
        for g in gpus:
            s = per_gpu.setdefault(g["index"], {"peak_memory_mib": 0.0, "utilization": []})
            s["peak_memory_mib"] = max(s["peak_memory_mib"], g["memory_used_mib"])
            s["utilization"].append(g["utilization_pct"])
    if not per_gpu:
        return None
    return {
        str(index): {
            "peak_memory_mib": s["peak_memory_mib"],
            "mean_utilization_pct": round(sum(s["utilization"]) / len(s["utilization"]), 1),
            "samples": len(s["utilization"]),
        }
        for index, s in sorted(per_gpu.items())
    }
