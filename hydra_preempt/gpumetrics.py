"""GPU figures through NVML (nvidia-ml-py's `pynvml`): one reading of every visible GPU.

The NVML module is passed in (`load_nvml` finds the real one), so the reading is tested with a
stand-in object and no GPU.
"""

from __future__ import annotations

import importlib
import os
from typing import Any


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
