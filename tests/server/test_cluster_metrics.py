"""The per-worker and per-GPU gauges, read from a fake cluster's worker status at scrape time."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.server.cluster_metrics import ClusterCollector

GPU = "GPU-0b1c2d3e-0000-1111-2222-333344445555"


class FakeStatusCluster:
    """Two polled workers as Cluster.worker_status lists them: a prefill worker with NVML readings, a CPU decode."""

    def __init__(self) -> None:
        self.workers: list[dict[str, Any]] = [
            {
                "worker_id": "prefill-0",
                "role": "prefill",
                "healthy": True,
                "gpu_uuid": GPU.removeprefix("GPU-"),  # as torch writes it
                "queued_requests": 3,
                "active_requests": 2,
                "pending_prefill_tokens": 700,
                "kv_blocks_total": 64,
                "kv_blocks_free": 60,
                "batch_size": 0,
                "prefix_cache_lookup_blocks": 40,
                "prefix_cache_hit_blocks": 30,
                "extra": {
                    "engine_failed": 0.0,
                    "gpu_power_watts": 312.5,
                    "gpu_memory_used_bytes": 7e10,
                    "gpu_memory_total_bytes": 8e10,
                    "gpu_utilization_ratio": 0.87,
                },
            },
            {
                "worker_id": "decode-0",
                "role": "decode",
                "healthy": False,
                "gpu_uuid": None,
                "queued_requests": 1,
                "active_requests": 5,
                "pending_prefill_tokens": 0,
                "kv_blocks_total": 128,
                "kv_blocks_free": 100,
                "batch_size": 5,
                "extra": {
                    "engine_failed": 0.0,
                    "engine_steps_total": 40.0,
                    "engine_step_host_seconds_total": 0.1,
                    "engine_step_device_wait_seconds_total": 0.3,
                },
            },
        ]

    def worker_status(self) -> list[dict[str, Any]]:
        return self.workers


def _scrape(cluster: FakeStatusCluster) -> str:
    registry = CollectorRegistry()
    registry.register(ClusterCollector(cluster.worker_status))
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(name, labels) -> value of every sample in an exposition text."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _key(name: str, worker_id: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset({"worker_id": worker_id, "role": worker_id.split("-")[0], **labels}.items())


def test_exports_each_workers_stats_and_gpu_readings():
    text = _scrape(FakeStatusCluster())
    samples = _samples(text)
    expected = {
        _key("splitserve_worker_healthy", "prefill-0"): 1.0,
        _key("splitserve_worker_healthy", "decode-0"): 0.0,
        _key("splitserve_worker_queued_requests", "prefill-0"): 3.0,
        _key("splitserve_worker_active_requests", "decode-0"): 5.0,
        _key("splitserve_worker_pending_prefill_tokens", "prefill-0"): 700.0,
        _key("splitserve_worker_kv_blocks_used", "prefill-0"): 4.0,
        _key("splitserve_worker_kv_blocks_used", "decode-0"): 28.0,
        _key("splitserve_worker_kv_blocks_total", "decode-0"): 128.0,
        _key("splitserve_worker_batch_size", "decode-0"): 5.0,
        _key("splitserve_worker_prefix_cache_lookup_blocks_total", "prefill-0"): 40.0,
        _key("splitserve_worker_prefix_cache_hit_blocks_total", "prefill-0"): 30.0,
        _key("splitserve_worker_prefix_cache_hit_blocks_total", "decode-0"): 0.0,
        _key("splitserve_gpu_power_watts", "prefill-0", gpu=GPU): 312.5,
        _key("splitserve_gpu_memory_used_bytes", "prefill-0", gpu=GPU): 7e10,
        _key("splitserve_gpu_memory_total_bytes", "prefill-0", gpu=GPU): 8e10,
        _key("splitserve_gpu_utilization_ratio", "prefill-0", gpu=GPU): 0.87,
        _key("splitserve_worker_engine_steps_total", "decode-0"): 40.0,
        _key("splitserve_worker_engine_step_host_seconds_total", "decode-0"): 0.1,
        _key("splitserve_worker_engine_step_device_wait_seconds_total", "decode-0"): 0.3,
    }
    assert {key: samples.get(key) for key in expected} == expected
    assert "# TYPE splitserve_gpu_power_watts gauge" in text
    types = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert types["splitserve_worker_engine_step_host_seconds"] == "counter"
    assert types["splitserve_worker_prefix_cache_hit_blocks"] == "counter"
    # a worker that reports no step counters (prefill-0 here) gets none
    assert not [key for key in samples if "engine_step" in key[0] and ("worker_id", "prefill-0") in key[1]]
    assert not [key for key in samples if key[0].startswith("splitserve_gpu_") and ("worker_id", "decode-0") in key[1]]
    assert len([key for key in samples if key[0] == "splitserve_worker_queued_requests"]) == 2


def test_reads_the_cluster_at_each_scrape():
    cluster = FakeStatusCluster()
    assert _key("splitserve_worker_healthy", "decode-0") in _samples(_scrape(cluster))
    cluster.workers.pop()  # decode-0 retired: it leaves the next scrape, no stale values
    cluster.workers.append({"worker_id": "decode-1", "role": "decode", "healthy": True})  # not polled yet
    samples = _samples(_scrape(cluster))
    assert not [key for key in samples if ("worker_id", "decode-0") in key[1]]
    assert samples[_key("splitserve_worker_healthy", "decode-1")] == 1.0
    assert _key("splitserve_worker_queued_requests", "decode-1") not in samples
