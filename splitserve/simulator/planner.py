"""Capacity planning: the cheapest pool split that meets the SLOs, goodput vs load, colocated vs disaggregated."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from splitserve.simulator.cluster import ClusterSpec
from splitserve.simulator.engine import simulate
from splitserve.simulator.metrics import Metrics, summarize
from splitserve.simulator.profile import Profile
from splitserve.simulator.workload import Workload
from splitserve.slo import SLO


@dataclass(frozen=True)
class Evaluated:
    cluster: ClusterSpec
    metrics: Metrics
    feasible: bool


@dataclass(frozen=True)
class Plan:
    """Every configuration simulated, in the order tried (cheapest first), and the cheapest feasible per mode."""

    tried: list[Evaluated]
    best: dict[str, Evaluated]  # by mode; a mode is absent when nothing within max_gpus met the target

    @property
    def recommended(self) -> Evaluated | None:
        return min(self.best.values(), key=lambda e: (e.cluster.cost_per_hour, e.cluster.gpus), default=None)


def candidates(
    template: ClusterSpec, profiles: Sequence[Profile], max_gpus: int, modes: Sequence[str]
) -> Iterator[ClusterSpec]:
    """All pool sizes (and GPU type per pool) within ``max_gpus``; batching limits come from ``template``."""
    dec_template = template.decode or template.prefill
    if "disaggregated" in modes:
        for pp, dp in itertools.product(profiles, repeat=2):
            for n_p in range(1, max_gpus):
                for n_d in range(1, max_gpus - n_p + 1):
                    yield replace(
                        template,
                        mode="disaggregated",
                        prefill=replace(template.prefill, replicas=n_p, profile=pp),
                        decode=replace(dec_template, replicas=n_d, profile=dp),
                    )
    if "colocated" in modes:
        for prof in profiles:
            for n in range(1, max_gpus + 1):
                yield replace(template, mode="colocated", prefill=replace(template.prefill, replicas=n, profile=prof))


def evaluate(cluster: ClusterSpec, workload: Workload, slo: SLO, target: float) -> Evaluated:
    m = summarize(simulate(cluster, workload), slo)
    return Evaluated(cluster, m, m.slo_attainment >= target)


def plan(
    template: ClusterSpec,
    profiles: Sequence[Profile],
    workload: Workload,
    slo: SLO,
    *,
    max_gpus: int,
    target: float = 0.9,
    modes: Sequence[str] = ("disaggregated", "colocated"),
) -> Plan:
    """Try configurations cheapest first and stop each mode at its first one meeting ``target`` attainment."""
    order = sorted(candidates(template, profiles, max_gpus, modes), key=lambda c: (c.cost_per_hour, c.gpus))
    tried: list[Evaluated] = []
    best: dict[str, Evaluated] = {}
    for cluster in order:
        if cluster.mode in best:
            continue
        ev = evaluate(cluster, workload, slo, target)
        tried.append(ev)
        if ev.feasible:
            best[cluster.mode] = ev
            if len(best) == len(modes):
                break
    return Plan(tried, best)


@dataclass(frozen=True)
class LoadPoint:
    rate: float
    metrics: Metrics


def sweep_load(cluster: ClusterSpec, workload: Workload, rates: Sequence[float], slo: SLO) -> list[LoadPoint]:
    """Goodput vs offered load: the workload time-stretched to each rate."""
    return [LoadPoint(r, summarize(simulate(cluster, workload.at_rate(r)), slo)) for r in rates]


def max_goodput_per_gpu(points: Sequence[LoadPoint]) -> LoadPoint:
    return max(points, key=lambda p: p.metrics.goodput_rps / p.metrics.gpus)


def describe(cluster: ClusterSpec) -> str:
    """``2xh100-sxm P + 3xh200-sxm D``, ``... + 1xh200-sxm hybrid`` or ``4xh100-sxm colocated``."""
    return " + ".join(
        f"{p.replicas}x{p.profile.gpu.name} {name[0].upper() if name in ('prefill', 'decode') else name}"
        for name, p in cluster.pools.items()
    )


def table(rows: Sequence[Evaluated]) -> str:
    """A fixed-width comparison table (Splitwise-style): one line per configuration."""
    head = ("config", "mode", "GPUs", "$/h", "SLO att", "goodput/GPU", "TTFT p90 ms", "TPOT p90 ms", "$/M tok", "J/tok")
    lines = [head]
    for e in rows:
        m, c = e.metrics, e.cluster
        lines.append(
            (
                describe(c),
                c.mode[:5],
                str(c.gpus),
                f"{c.cost_per_hour:.2f}",
                f"{m.slo_attainment:.3f}",
                f"{m.goodput_rps / c.gpus:.2f}",
                f"{m.ttft_s.p90 * 1e3:.1f}",
                f"{m.tpot_s.p90 * 1e3:.1f}",
                f"{m.cost_per_m_output_tokens:.3f}",
                f"{m.joules_per_output_token:.3f}",
            )
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in lines)
