"""Turn a run's raw per-request times into the numbers a capacity plan is judged on."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from splitserve.simulator.engine import RunResult
from splitserve.slo import SLO


@dataclass(frozen=True)
class Percentiles:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, x: np.ndarray) -> Percentiles:
        x = x[~np.isnan(x)]
        if not len(x):
            return cls(*([float("nan")] * 4))
        p50, p90, p99 = np.percentile(x, [50, 90, 99])
        return cls(float(x.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class Metrics:
    """Latencies in seconds; throughput over the makespan (first arrival to last finish)."""

    requests: int
    gpus: int
    ttft_s: Percentiles
    tpot_s: Percentiles
    e2e_s: Percentiles
    makespan_s: float
    output_tokens_per_s: float
    requests_per_s: float
    slo_attainment: float
    goodput_rps: float
    utilisation: dict[str, float]  # busy fraction per pool
    cost_per_m_output_tokens: float
    joules_per_output_token: float

    def to_dict(self) -> dict:
        return asdict(self)


def tpot(result: RunResult) -> np.ndarray:
    """Mean time per output token after the first; NaN for one-token outputs (they have none)."""
    out = result.workload.output_tokens
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(out > 1, (result.finish_s - result.first_token_s) / (out - 1), np.nan)


def summarize(result: RunResult, slo: SLO) -> Metrics:
    wl, cluster = result.workload, result.cluster
    ttft = result.first_token_s - wl.arrival_s
    per_tok = tpot(result)
    e2e = result.finish_s - wl.arrival_s
    makespan = float(np.nanmax(result.finish_s) - wl.arrival_s[0])
    ok = (ttft <= slo.ttft_s) & (np.isnan(per_tok) | (per_tok <= slo.tpot_s))
    out_tokens = float(wl.output_tokens.sum())
    util, busy_j, idle_j = {}, 0.0, 0.0
    for name, pool in cluster.pools.items():  # busy_s is per worker; each of a worker's tp GPUs draws power
        worker_s = pool.replicas * makespan
        busy = result.busy_s[name]
        util[name] = busy / worker_s
        busy_j += busy * pool.tp * pool.profile.gpu.power_w
        idle_j += (worker_s - busy) * pool.tp * pool.profile.gpu.idle_power_w
    if cluster.shared_gpus:  # each pair's GPU idles once, while neither of its pools is busy
        idle_s = max(0.0, cluster.gpus * makespan - sum(result.busy_s.values()))
        idle_j = idle_s * cluster.prefill.profile.gpu.idle_power_w
    joules = busy_j + idle_j
    dollars = cluster.cost_per_hour * makespan / 3600.0
    return Metrics(
        requests=len(wl),
        gpus=cluster.gpus,
        ttft_s=Percentiles.of(ttft),
        tpot_s=Percentiles.of(per_tok),
        e2e_s=Percentiles.of(e2e),
        makespan_s=makespan,
        output_tokens_per_s=out_tokens / makespan,
        requests_per_s=len(wl) / makespan,
        slo_attainment=float(ok.mean()),
        goodput_rps=float(ok.sum()) / makespan,
        utilisation=util,
        cost_per_m_output_tokens=dollars / out_tokens * 1e6,
        joules_per_output_token=joules / out_tokens,
    )
