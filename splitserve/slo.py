"""Latency targets, shared by the live benchmarks and the simulator so both count goodput the same way."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SLO:
    """A request meets the SLOs when its time to first token and its mean time per output token are within these."""

    ttft_ms: float = 1000.0
    tpot_ms: float = 50.0

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1e3

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1e3
