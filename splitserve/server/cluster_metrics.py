"""Per-worker and per-GPU gauges for /metrics, read from the cluster at scrape time.

A collector rather than gauges set by the health loop: a worker that is removed or restarted vanishes from the next
scrape instead of leaving its last values behind, and nothing has to remember to update them. Every gauge carries
``worker_id`` and ``role``, so ``sum by (role)`` gives the prefill and decode pools. A tensor-parallel worker is one
worker here: ``splitserve_worker_tensor_parallel_size`` and ``splitserve_worker_gpus`` say how many ranks and GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitserve.engine.step_timing import STEP_COUNTERS
from splitserve.engine.tensor_parallel import HANDOFF_COUNTERS
from splitserve.gpu_stats import GPU_READINGS, nvml_form

WorkerSource = Callable[[], list[dict[str, Any]]]
_LABELS = ["worker_id", "role"]

# Gauge name (after ``splitserve_worker_``) -> help; the values come from the worker's polled WorkerStats.
_STATS_HELP: dict[str, str] = {
    "queued_requests": "Requests waiting on the worker.",
    "active_requests": "Requests the worker is running.",
    "pending_prefill_tokens": "Prompt tokens queued for prefill.",
    "kv_blocks_used": "KV cache blocks in use.",
    "kv_blocks_total": "KV cache blocks of the worker.",
    "batch_size": "Sequences in the worker's current decode batch.",
}
# Counter name (after ``splitserve_worker_``, before ``_total``) -> help; also from the polled WorkerStats.
_PREFIX_HELP: dict[str, str] = {
    "prefix_cache_lookup_blocks": "Prompt KV blocks looked up in the worker's prefix cache.",
    "prefix_cache_hit_blocks": "Prompt KV blocks found in the worker's prefix cache (not computed).",
}


def _stats_values(worker: Mapping[str, Any]) -> dict[str, float]:
    def num(key: str) -> float:
        return float(worker.get(key) or 0)

    values = {key: num(key) for key in _STATS_HELP if key != "kv_blocks_used"}
    values["kv_blocks_used"] = num("kv_blocks_total") - num("kv_blocks_free")
    return values


class ClusterCollector(Collector):
    """Exports ``splitserve_worker_*`` gauges and step counters and ``splitserve_gpu_*`` gauges from ``workers()``
    (Cluster.worker_status).

    Stats gauges appear once the health loop has polled a worker; GPU gauges only for workers that report NVML
    readings, labelled also by the GPU's UUID (workers that share a GPU report the same device).
    """

    def __init__(self, workers: WorkerSource):
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        workers = self._workers()
        healthy = GaugeMetricFamily(
            "splitserve_worker_healthy", "1 while the worker passes its health checks, else 0.", labels=_LABELS
        )
        ranks = GaugeMetricFamily(
            "splitserve_worker_tensor_parallel_size",
            "Ranks of the worker's tensor-parallel group (1: a single-process worker).",
            labels=_LABELS,
        )
        gpus = GaugeMetricFamily(
            "splitserve_worker_gpus", "GPUs the worker holds, all its ranks together (0 on CPU).", labels=_LABELS
        )
        stats = {
            name: GaugeMetricFamily(f"splitserve_worker_{name}", text, labels=_LABELS)
            for name, text in _STATS_HELP.items()
        }
        prefix = {
            name: CounterMetricFamily(f"splitserve_worker_{name}", text, labels=_LABELS)
            for name, text in _PREFIX_HELP.items()
        }
        steps = {
            key: CounterMetricFamily(f"splitserve_worker_{key.removesuffix('_total')}", text, labels=_LABELS)
            for key, text in {**STEP_COUNTERS, **HANDOFF_COUNTERS}.items()
        }
        gpu = {
            key: GaugeMetricFamily(f"splitserve_{key}", text, labels=[*_LABELS, "gpu"])
            for key, text in GPU_READINGS.items()
        }
        for w in workers:
            labels = [w["worker_id"], w["role"]]
            healthy.add_metric(labels, float(bool(w.get("healthy"))))
            ranks.add_metric(labels, float(w.get("tensor_parallel_size") or 1))
            gpus.add_metric(labels, float(w.get("gpus") or 0))
            if "kv_blocks_total" not in w:  # not polled yet
                continue
            for name, value in _stats_values(w).items():
                stats[name].add_metric(labels, value)
            for name, counter in prefix.items():
                counter.add_metric(labels, float(w.get(name) or 0))
            extra: Mapping[str, float] = w.get("extra") or {}
            for key, counter in steps.items():
                if key in extra:
                    counter.add_metric(labels, float(extra[key]))
            for key, family in gpu.items():
                if key in extra:
                    family.add_metric([*labels, nvml_form(w.get("gpu_uuid") or "")], float(extra[key]))
        yield healthy
        yield ranks
        yield gpus
        yield from stats.values()
        yield from prefix.values()
        yield from steps.values()
        yield from gpu.values()
