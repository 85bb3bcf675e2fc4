"""NVML readings (power, memory, utilisation) of the GPU a worker runs on, added to its stats for /metrics.

Every NVML failure (no library, no driver, no such GPU, a reading the GPU does not support) just leaves readings
out: a CPU worker, or a GPU NVML cannot see, reports none, and a worker's stats never fail because of them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# WorkerStats.extra key -> help text; the cluster collector exports each as a gauge of the same name.
GPU_READINGS: dict[str, str] = {
    "gpu_power_watts": "Power the worker's GPU draws.",
    "gpu_memory_used_bytes": "Memory in use on the worker's GPU (all processes).",
    "gpu_memory_total_bytes": "Memory of the worker's GPU.",
    "gpu_utilization_ratio": "Fraction of the last sample period in which the worker's GPU ran a kernel.",
}


@functools.cache
def _nvml() -> Any:
    """The pynvml module, initialised once per process; None where NVML is unusable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def nvml_uuid(device: torch.device) -> str | None:
    """The UUID NVML knows ``device`` by (torch prints it without NVML's ``GPU-`` prefix); None off CUDA."""
    if device.type != "cuda":
        return None
    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", ""))
    return nvml_form(uuid) or None


def nvml_form(uuid: str) -> str:
    """``uuid`` as NVML and nvidia-smi write it (``GPU-…``); "" stays ""."""
    return uuid if not uuid or uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class GpuReader:
    """Reads one GPU by UUID, which stays right under CUDA_VISIBLE_DEVICES remapping (an index would not)."""

    def __init__(self, uuid: str | None):
        self._handle: Any = None
        nvml = _nvml() if uuid else None
        if nvml is not None:
            try:
                self._handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            except Exception:
                log.debug("NVML does not know GPU %s; no GPU readings", uuid)

    @classmethod
    def for_device(cls, device: torch.device) -> GpuReader:
        return cls(nvml_uuid(device))

    def read(self) -> dict[str, float]:
        """The readings this GPU supports now (cheap driver queries); {} without one."""
        nvml = _nvml()
        if self._handle is None or nvml is None:
            return {}
        readings: dict[str, float] = {}
        for probe in (_power, _memory, _utilization):
            try:
                readings.update(probe(nvml, self._handle))
            except Exception:  # not supported on this GPU (or a MIG slice): leave it out
                continue
        return readings


def _power(nvml: Any, handle: Any) -> dict[str, float]:
    return {"gpu_power_watts": nvml.nvmlDeviceGetPowerUsage(handle) / 1000}  # NVML reports milliwatts


def _memory(nvml: Any, handle: Any) -> dict[str, float]:
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return {"gpu_memory_used_bytes": float(info.used), "gpu_memory_total_bytes": float(info.total)}


def _utilization(nvml: Any, handle: Any) -> dict[str, float]:
    return {"gpu_utilization_ratio": nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100}
