"""What machine a profile is measured on: the GPU's name as profiles spell it, the device in words, and its board
power while the engine runs (NVML through ``splitserve.gpu_stats``; nothing on a CPU)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import threading
import time
from typing import Any

import torch

POWER_PERIOD_S = 0.05


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``h100-80gb-hbm3``: a profile's GPU name, as plans print it."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug.removeprefix("nvidia-") or "gpu"


def device_slug(device: torch.device) -> str:
    return gpu_slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"


class PowerSampler:
    """Reads the GPU's board power on a thread while the engine runs, so ``power_w`` is the draw under this
    workload rather than the TDP. Without NVML (no GPU, no driver library) it reads nothing."""

    def __init__(self, device: torch.device):
        self._reader: Any = None
        if device.type == "cuda":
            from splitserve.gpu_stats import GpuReader

            self._reader = GpuReader.for_device(device)
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> float | None:
        watts = self._reader.read().get("gpu_power_watts") if self._reader is not None else None
        return float(watts) if watts is not None else None

    def sample_for(self, seconds: float) -> float | None:
        """Median power over ``seconds`` of polling (the idle reading)."""
        readings = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if (watts := self.read()) is None:
                return None
            readings.append(watts)
            time.sleep(POWER_PERIOD_S)
        return statistics.median(readings) if readings else None

    def __enter__(self) -> PowerSampler:
        if self.read() is not None:
            self._thread = threading.Thread(target=self._poll, name="profile-power", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(POWER_PERIOD_S):
            if (watts := self.read()) is not None:
                self._samples.append(watts)

    @property
    def median(self) -> float | None:
        return statistics.median(self._samples) if self._samples else None


def describe_device(device: torch.device) -> str:
    """The device in words, for a profile's header: the CUDA name, or the CPU and the threads torch used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"
