from __future__ import annotations

import pytest

from splitserve.simulator.cluster import ClusterSpec, PoolSpec
from splitserve.simulator.planner import max_goodput_per_gpu, plan, sweep_load, table
from splitserve.simulator.workload import LengthDist, synthetic
from splitserve.slo import SLO
from tests.simulator.conftest import make_profile

PROMPT = 2000


def _prefill_bound_case(profile):
    """Prefill one prompt at a time with offered prefill work 2.5 servers: 2 prefill replicas overflow, 3 suffice;
    two-token outputs make decode trivial. The cheapest feasible split is therefore 3 prefill + 1 decode."""
    service = profile.prefill_time(PROMPT)
    wl = synthetic(
        rate=2.5 / service, num_requests=3000, prompt=LengthDist("fixed", PROMPT), output=LengthDist("fixed", 2), seed=4
    )
    template = ClusterSpec("disaggregated", PoolSpec(1, profile, max_batch_requests=1), PoolSpec(1, profile))
    return wl, template


def test_planner_finds_the_obvious_split():
    toy = make_profile()
    wl, template = _prefill_bound_case(toy)
    result = plan(template, [toy], wl, SLO(ttft_ms=1000, tpot_ms=1000), max_gpus=6, modes=["disaggregated"])
    best = result.recommended
    assert best is not None
    assert (best.cluster.prefill.replicas, best.cluster.decode.replicas) == (3, 1)
    # everything tried before it was cheaper and failed
    assert all(not e.feasible and e.cluster.cost_per_hour <= best.cluster.cost_per_hour for e in result.tried[:-1])
    assert "3xtoy P + 1xtoy D" in table(result.tried)


def test_planner_picks_the_cheaper_gpu_type_when_both_are_equally_fast():
    cheap, dear = make_profile(cost=1.0, name="cheap"), make_profile(cost=3.0, name="dear")
    wl, template = _prefill_bound_case(dear)
    result = plan(template, [dear, cheap], wl, SLO(ttft_ms=1000, tpot_ms=1000), max_gpus=5, modes=["disaggregated"])
    best = result.recommended
    assert best is not None
    assert {p.profile.gpu.name for p in best.cluster.pools.values()} == {"cheap"}
    assert best.cluster.cost_per_hour == pytest.approx(4.0)


def test_planner_reports_no_plan_when_max_gpus_is_too_small():
    toy = make_profile()
    wl, template = _prefill_bound_case(toy)
    result = plan(template, [toy], wl, SLO(ttft_ms=1000, tpot_ms=1000), max_gpus=3, modes=["disaggregated"])
    assert result.recommended is None and len(result.tried) == 3


def test_goodput_saturates_with_load():
    toy = make_profile()
    wl, template = _prefill_bound_case(toy)
    cluster = template.with_replicas(3, 1)
    service = toy.prefill_time(PROMPT)
    points = sweep_load(cluster, wl.head(1500), [r / service for r in (0.5, 1.5, 2.5, 4.0)], SLO(1000, 1000))
    goodput = [p.metrics.goodput_rps for p in points]
    assert goodput[0] < goodput[1] < goodput[2]  # below capacity goodput tracks load
    assert goodput[3] < 3 / service  # never above the prefill pool's capacity
    assert max_goodput_per_gpu(points).rate in (points[1].rate, points[2].rate)
