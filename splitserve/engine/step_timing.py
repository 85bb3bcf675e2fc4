"""Where an engine's steps spend their time: host work, or waiting for the device.

A step's host work (scheduling, inputs, launches, then each token appended and detokenized) leaves the GPU idle
unless it overlaps the device's work (docs/benchmarks.md has served steps' split). The totals are cheap to keep
(three clock reads a step) and workers export them as counters, so ``rate(host) / rate(host + device wait)`` shows
a host-bound worker in production.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from splitserve.engine.host_copy import DeviceWait

# WorkerStats.extra key -> help text; the cluster collector exports each as a counter of the same name.
STEP_COUNTERS: dict[str, str] = {
    "engine_steps_total": "Engine steps the worker ran.",
    "engine_step_host_seconds_total": "Time the worker's engine steps spent on the host (scheduling, launches, "
    "appending and detokenizing tokens): the device idles through it unless it overlaps a step.",
    "engine_step_device_wait_seconds_total": "Time the worker's engine steps waited for the device.",
}


@dataclass
class StepTimes:
    steps: int = 0
    host_s: float = 0.0
    device_wait_s: float = 0.0

    def timed_wait(self, wait: DeviceWait | None) -> DeviceWait:
        """``wait`` (or a plain call) that adds the blocking part to ``device_wait_s``."""

        def run(blocking: Callable[[], None]) -> None:
            def timed() -> None:
                start = time.perf_counter()
                try:
                    blocking()
                finally:
                    self.device_wait_s += time.perf_counter() - start

            (wait or (lambda b: b()))(timed)

        return run

    def add_step(self, seconds: float, device_wait_s_before: float) -> None:
        """Count a step of ``seconds`` whose device wait is what ``device_wait_s`` gained since it began."""
        self.steps += 1
        self.host_s += seconds - (self.device_wait_s - device_wait_s_before)

    def as_extra(self) -> dict[str, float]:
        return {
            "engine_steps_total": float(self.steps),
            "engine_step_host_seconds_total": self.host_s,
            "engine_step_device_wait_seconds_total": self.device_wait_s,
        }
