"""Profiles for the simulator tests: the shipped YAMLs, and a synthetic one whose numbers are easy to reason about."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.simulator.profile import Profile, TPScaling, load_profile

PROFILES = Path(__file__).resolve().parents[2] / "configs" / "profiles"
# Llama-3-8B's shape, and H100 NVLink figures assumed for an all-reduce (as the shipped derived profiles assume).
LLAMA3_8B = TPScaling(
    layers=32,
    hidden_size=4096,
    kv_heads=8,
    weight_bytes=16.06e9,
    prefill_efficiency=0.9,
    link_latency_s=1e-5,
    link_bandwidth_bytes_per_s=3.6e11,
)


@pytest.fixture(scope="session")
def h100() -> Profile:
    return load_profile(PROFILES / "llama3-8b-h100.yaml")


@pytest.fixture(scope="session")
def h200() -> Profile:
    return load_profile(PROFILES / "llama3-8b-h200.yaml")


def make_profile(cost: float = 1.0, name: str = "toy", kv_capacity: int = 100_000) -> Profile:
    """Prefill 10 ms + 10 us/token, decode 5 ms + 0.1 ms/seq + 10 ns/context token, 1 ms + 1 GB/s transfer."""
    return Profile.model_validate(
        {
            "model": "toy",
            "gpu": {"name": name, "cost_per_hour": cost, "power_w": 500, "idle_power_w": 50},
            "kv_bytes_per_token": 1000,
            "kv_capacity_tokens": kv_capacity,
            "prefill": {"tokens": [1, 10_000], "seconds": [0.01, 0.01 + 9_999 * 1e-5]},
            "decode": {"base_s": 0.005, "per_seq_s": 1e-4, "per_context_token_s": 1e-8},
            "kv_transfer": {"nccl": {"latency_s": 0.001, "bandwidth_bytes_per_s": 1e9}},
        }
    )


@pytest.fixture(scope="session")
def toy() -> Profile:
    return make_profile()
