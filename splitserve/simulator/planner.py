"""Capacity planning: the cheapest pool split that meets the SLOs, goodput vs load, colocated vs disaggregated."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from splitserve.simulator.cluster import ClusterSpec, PoolSpec
from splitserve.simulator.engine import simulate
from splitserve.simulator.metrics import Metrics, summarize
from splitserve.simulator.profile import Profile
from splitserve.simulator.workload import Workload
from splitserve.slo import SLO

CHUNKS = (256, 512, 1024, 2048, 8192)  # colocated step token budgets the planner tries (Sarathi's chunk size)


@dataclass(frozen=True)
class Evaluated:
    cluster: ClusterSpec
    metrics: Metrics
    feasible: bool

    def rank(self) -> tuple[float, int, float]:
        """Cheaper first, then fewer GPUs, then more goodput per GPU."""
        return (self.cluster.cost_per_hour, self.cluster.gpus, -self.metrics.goodput_rps / self.cluster.gpus)


@dataclass(frozen=True)
class Plan:
    """``layouts``: the cheapest feasible cluster of each layout that has one (a layout is the profile, so GPU type
    and TP degree, of each pool, and a colocated pool's chunk), best first; ``best``: the first of each mode;
    ``tried``: every cluster within ``max_gpus`` simulated, cheapest first; ``runs``: simulations made, bounds
    beyond ``max_gpus`` included."""

    tried: list[Evaluated]
    layouts: list[Evaluated]
    best: dict[str, Evaluated]  # by mode; a mode is absent when nothing within max_gpus met the target
    runs: int

    @property
    def recommended(self) -> Evaluated | None:
        return min(self.best.values(), key=Evaluated.rank, default=None)


def least(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The least ``n`` in ``[lo, hi]`` with ``ok(n)``, for ``ok`` monotone (false then true): doubling from ``lo``,
    then bisection, so about ``2 log2(answer)`` probes; None when ``ok(hi)`` is false."""
    if lo > hi:
        return None
    below, n = lo - 1, lo
    while not ok(n):
        if n == hi:
            return None
        below, n = n, min(2 * n, hi)
    while n - below > 1:  # ok(n), not ok(below)
        mid = (below + n) // 2
        below, n = (below, mid) if ok(mid) else (mid, n)
    return n


class _Search:
    """Simulates each cluster at most once (by profiles, replica counts and chunk)."""

    def __init__(self, workload: Workload, slo: SLO, target: float, max_gpus: int) -> None:
        self.workload, self.slo, self.target, self.max_gpus = workload, slo, target, max_gpus
        self.runs: dict[tuple, Evaluated] = {}

    def evaluate(self, cluster: ClusterSpec) -> Evaluated:
        key = tuple((id(p.profile), p.replicas, p.max_batch_tokens) for p in cluster.pools.values())
        if (key, cluster.mode) not in self.runs:
            self.runs[key, cluster.mode] = evaluate(cluster, self.workload, self.slo, self.target)
        return self.runs[key, cluster.mode]

    def tried(self) -> list[Evaluated]:
        within = [e for e in self.runs.values() if e.cluster.gpus <= self.max_gpus]
        return sorted(within, key=Evaluated.rank)

    def colocated(self, template: ClusterSpec) -> Evaluated | None:
        """The fewest replicas of ``template``'s pool meeting the target within ``max_gpus``."""

        def ok(n: int) -> bool:
            return self.evaluate(template.with_replicas(n)).feasible

        n = least(1, self.max_gpus // template.prefill.tp, ok)
        return None if n is None else self.evaluate(template.with_replicas(n))

    def disaggregated(self, template: ClusterSpec) -> Evaluated | None:
        """The cheapest (prefill, decode) replica counts of ``template``'s layout meeting the target within
        ``max_gpus``. Assumes more replicas in either pool never hurt: the least prefill (decode) count that meets
        the target beside the most decode (prefill) replicas any split allows bounds each pool from below; then,
        for each prefill count up from its bound, the least decode count that meets it (never more than the
        previous prefill count's), until a split's lower bound costs more than the best found."""
        assert template.decode is not None
        tp_p, tp_d, budget = template.prefill.tp, template.decode.tp, self.max_gpus
        most_p, most_d = (budget - tp_d) // tp_p, (budget - tp_p) // tp_d
        if most_p < 1 or most_d < 1:
            return None

        def ok(n_p: int, n_d: int) -> bool:
            return self.evaluate(template.with_replicas(n_p, n_d)).feasible

        least_p = least(1, most_p, lambda n: ok(n, most_d))
        least_d = least(1, most_d, lambda n: ok(most_p, n))
        if least_p is None or least_d is None:
            return None
        best: Evaluated | None = None
        ceiling = most_d
        for n_p in range(least_p, most_p + 1):
            cap = min(ceiling, (budget - n_p * tp_p) // tp_d)
            if cap < least_d:
                break
            if best is not None and template.with_replicas(n_p, least_d).cost_per_hour > best.cluster.cost_per_hour:
                break
            n_d = least(least_d, cap, functools.partial(ok, n_p))
            if n_d is None:
                continue
            found = self.evaluate(template.with_replicas(n_p, n_d))
            best = found if best is None or found.rank() < best.rank() else best
            ceiling = n_d
        return best


def layouts(
    template: ClusterSpec, profiles: Sequence[Profile], modes: Sequence[str], chunks: Sequence[int]
) -> Iterator[ClusterSpec]:
    """One cluster (1 replica a pool) per layout: every profile on every pool (disaggregated), every profile at
    every chunk (colocated). Batching limits come from ``template``."""
    dec_template = template.decode or template.prefill
    if "disaggregated" in modes:
        for pp, dp in itertools.product(profiles, repeat=2):
            yield replace(
                template,
                mode="disaggregated",
                prefill=replace(template.prefill, replicas=1, profile=pp),
                decode=replace(dec_template, replicas=1, profile=dp),
            )
    if "colocated" in modes:
        for prof, chunk in itertools.product(profiles, chunks):
            pool = replace(template.prefill, replicas=1, profile=prof, max_batch_tokens=chunk)
            yield replace(template, mode="colocated", prefill=pool)


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
    chunks: Sequence[int] = CHUNKS,
) -> Plan:
    """DistServe's placement search: for each layout (each pool's profile, so its GPU type and TP degree; a
    colocated pool's chunk too) the cheapest replica counts meeting ``target`` SLO attainment within ``max_gpus``,
    then the best of them (``Evaluated.rank``) per mode."""
    search = _Search(workload, slo, target, max_gpus)
    found = []
    for layout in layouts(template, profiles, modes, chunks):
        best = search.disaggregated(layout) if layout.mode == "disaggregated" else search.colocated(layout)
        if best is not None:
            found.append(best)
    found.sort(key=Evaluated.rank)
    best_of: dict[str, Evaluated] = {}
    for e in found:
        best_of.setdefault(e.cluster.mode, e)
    return Plan(search.tried(), found, best_of, len(search.runs))


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
    """Each pool as replicas x TP degree: ``2xTP2 h100-sxm P + 3xTP1 h200-sxm D``, ``... + 1xTP1 h200-sxm hybrid``
    or ``4xTP1 h100-sxm colocated``; a derived profile's GPU name is starred."""

    def pool(name: str, p: PoolSpec) -> str:
        star = "*" if p.profile.derived else ""
        role = name[0].upper() if name in ("prefill", "decode") else name
        return f"{p.replicas}xTP{p.tp} {p.profile.gpu.name}{star} {role}"

    return " + ".join(pool(name, p) for name, p in cluster.pools.items())


def table(rows: Sequence[Evaluated]) -> str:
    """A fixed-width comparison table (Splitwise-style): one line per configuration."""
    head = (
        *("config", "mode", "chunk", "GPUs", "$/h", "SLO att", "goodput/GPU"),
        *("TTFT p90 ms", "TPOT p90 ms", "$/M tok", "J/tok"),
    )
    lines = [head]
    for e in rows:
        m, c = e.metrics, e.cluster
        lines.append(
            (
                describe(c),
                c.mode[:5],
                str(c.prefill.max_batch_tokens) if c.mode == "colocated" else "-",
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
