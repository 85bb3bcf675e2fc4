"""A live run's overheads fitted back: from "measured" figures and step traces whose overheads are known."""

from __future__ import annotations

import numpy as np
import pytest

from splitserve.bench.serving_fit import (
    fit_ingress,
    fit_prompt_step_floor,
    fit_serving,
    fit_shared_gpu_prefill_slowdown,
    fit_shared_gpu_slowdown,
    passes_alone,
)
from splitserve.bench.validate import predicted_figures
from splitserve.engine.step_trace import StepRecord
from splitserve.simulator import ClusterSpec, PoolSpec, simulate, summarize
from splitserve.simulator.profile import ServingSpec
from splitserve.simulator.workload import Workload
from splitserve.slo import SLO
from tests.simulator.conftest import make_profile


def _step(start: float, seconds: float, prefill: int = 0, decodes: int = 0, context: int = 0, pid: int = 1):
    return StepRecord(start, seconds, 0.0, prefill, 1 if prefill else 0, decodes, context, read_back=False, pid=pid)


def test_the_served_floor_of_prompt_steps_is_fitted_where_the_profile_prices_them_below_it():

    toy = make_profile()  # prefill 10 ms + 10 us per token
    short = [_step(i, 0.030 + 1e-4 * (i % 3), prefill=100 + 50 * i, decodes=2, context=300) for i in range(9)]
    long = [
        _step(10 + i, toy.step_time(4000 + 500 * i, 2, 300), prefill=4000 + 500 * i, decodes=2, context=300)
        for i in range(5)
    ]
    decodes = [_step(20, 0.001, decodes=4, context=100)]  # no prompt chunk: no say in the floor
    assert fit_prompt_step_floor(short + long + decodes, toy) == pytest.approx(0.0301)
    assert fit_prompt_step_floor(long, toy) == 0.0  # steps the profile already prices: no floor
    assert fit_prompt_step_floor(decodes, toy) == 0.0


def test_fit_serving_recovers_known_overheads():
    """Figures "measured" on a simulated cluster with known overheads: the fit from the bare profile finds them."""

    bare = make_profile()
    true = ServingSpec(request_s=0.025, step_s=0.004)

    def cluster_for(profile):
        return ClusterSpec("colocated", PoolSpec(1, profile))

    wl = Workload(np.arange(40) * 2.0, np.full(40, 300), np.full(40, 20))
    served = bare.model_copy(update={"serving": true})
    measured = predicted_figures(summarize(simulate(cluster_for(served), wl), SLO()))
    fitted = fit_serving(cluster_for, bare, wl, measured, SLO())
    assert fitted.step_s == pytest.approx(true.step_s, rel=1e-6)
    assert fitted.request_s == pytest.approx(true.request_s, rel=1e-6)
    assert fitted.prompt_token_s == 0.0  # one prompt length: nothing to spread


def test_fit_serving_recovers_a_per_prompt_token_latency_from_the_ttft_spread():

    bare = make_profile()
    true = ServingSpec(request_s=0.01, step_s=0.002, prompt_token_s=2e-5)

    def cluster_for(profile):
        return ClusterSpec("colocated", PoolSpec(1, profile))

    prompts = np.random.default_rng(0).integers(100, 1000, 60)
    wl = Workload(np.arange(60) * 2.0, prompts, np.full(60, 20))
    measured = predicted_figures(summarize(simulate(cluster_for(bare.model_copy(update={"serving": true})), wl), SLO()))
    fitted = fit_serving(cluster_for, bare, wl, measured, SLO())
    assert fitted.step_s == pytest.approx(true.step_s, rel=1e-6)
    # p50 and p90 pin two unknowns only up to the percentiles' interpolation between requests
    assert fitted.prompt_token_s == pytest.approx(true.prompt_token_s, rel=0.05)
    assert fitted.request_s == pytest.approx(true.request_s, rel=0.05)


def test_fit_serving_keeps_the_median_when_the_spread_asks_for_more_than_it():
    """A TTFT p90 far above the p50 (a tail the model lacks): the prompt term widens the spread only as far as the
    median allows (no negative per-request latency), and the median still matches."""

    bare = make_profile()

    def cluster_for(profile):
        return ClusterSpec("colocated", PoolSpec(1, profile))

    prompts = np.random.default_rng(0).integers(100, 1000, 60)
    wl = Workload(np.arange(60) * 2.0, prompts, np.full(60, 20))
    measured = predicted_figures(summarize(simulate(cluster_for(bare), wl), SLO()))
    measured = {**measured, "ttft_p50_ms": measured["ttft_p50_ms"] + 5.0, "ttft_p90_ms": measured["ttft_p90_ms"] + 80}
    fitted = fit_serving(cluster_for, bare, wl, measured, SLO())
    assert fitted.request_s >= 0 and fitted.prompt_token_s > 0
    again = predicted_figures(summarize(simulate(cluster_for(bare.model_copy(update={"serving": fitted})), wl), SLO()))
    assert again["ttft_p50_ms"] == pytest.approx(measured["ttft_p50_ms"], abs=0.01)
    assert again["ttft_p90_ms"] < measured["ttft_p90_ms"]


def test_the_ingress_is_the_median_wait_of_a_request_that_wakes_an_idle_engine():
    arrivals = [1.0, 2.0, 2.001, 3.0, 5.0]
    steps = [
        _step(1.005, 0.03, prefill=300),  # woken by 1.0: waited 5 ms
        _step(1.035, 0.005, decodes=1, context=301),
        _step(2.006, 0.03, prefill=600),  # woken by 2.0 (2.001 came along): 6 ms
        _step(2.036, 0.005, decodes=2, context=900),
        _step(3.002, 0.03, prefill=200, decodes=2, context=910),  # decodes ran: the engine was not idle
        _step(5.009, 0.03, prefill=100),  # woken by 5.0: 9 ms
    ]
    assert fit_ingress(steps, arrivals) == pytest.approx(0.006)
    assert fit_ingress(steps[1:2], arrivals) == 0.0  # no idle engine woken: nothing to fit
    two_workers = [*steps, _step(4.0, 0.03, prefill=100, pid=2)]
    assert fit_ingress(two_workers, arrivals) == 0.0  # which worker an arrival went to is not in the trace
    decode_worker = [*steps, _step(4.0, 0.005, decodes=3, context=900, pid=2)]
    assert fit_ingress(decode_worker, arrivals) == pytest.approx(0.006)  # it runs no prompts: no say


def test_fit_serving_takes_the_ingress_from_the_trace_and_leaves_the_rest_to_the_per_request_latency():
    bare = make_profile()
    true = ServingSpec(request_s=0.01, ingress_s=0.004)

    def cluster_for(profile):
        return ClusterSpec("colocated", PoolSpec(1, profile, overlap_decode=True))

    wl = Workload(np.arange(40) * 2.0, np.full(40, 300), np.full(40, 20))
    measured = predicted_figures(summarize(simulate(cluster_for(bare.model_copy(update={"serving": true})), wl), SLO()))
    start = 100.0  # the trace's clock when the run began
    woken = [_step(start + a + true.ingress_s, bare.prefill_time(300), prefill=300) for a in wl.arrival_s]
    fitted = fit_serving(cluster_for, bare, wl, measured, SLO(), woken, trace_start_s=start)
    assert fitted.ingress_s == pytest.approx(true.ingress_s, rel=1e-6)
    assert fitted.request_s == pytest.approx(true.request_s, rel=1e-6)
    without = fit_serving(cluster_for, bare, wl, measured, SLO())  # no trace: the whole wait is per-request latency
    assert without.ingress_s == 0 and without.request_s == pytest.approx(true.request_s + true.ingress_s, rel=1e-6)


def test_the_shared_gpu_slowdown_is_the_decode_steps_slope_on_their_time_beside_prefill_passes():
    passes = [_step(1.0, 0.1, prefill=2000, pid=1), _step(2.0, 0.1, prefill=2000, pid=1)]
    alone = [_step(0.5 + 0.01 * i, 0.005, decodes=2, context=100, pid=2) for i in range(10)]
    beside = [_step(1.01 + 0.02 * i, 0.010, decodes=2, context=100, pid=2) for i in range(4)]  # half their speed
    half = [_step(1.095, 0.0075, decodes=2, context=100, pid=2)]  # 5 ms beside, then 2.5 ms alone
    assert fit_shared_gpu_slowdown(passes + alone + beside + half) == pytest.approx(0.5)
    assert fit_shared_gpu_slowdown(passes + alone) == 0.0  # never beside a pass: nothing to fit
    second_prefill = [_step(3.0, 0.1, prefill=100, pid=3)]
    assert fit_shared_gpu_slowdown(passes + alone + beside + second_prefill) == 0.0  # which pairs with which?


def test_a_prefill_pass_beside_decode_steps_throughout_gives_the_share_of_device_speed_it_lost():
    """Passes that had decode steps beside them all along took twice their price: half the device. Passes alone
    set the floor's fit apart; a host-bound pass (its floor above its price) counts from its floor."""
    profile = make_profile()
    price = profile.prefill_time(500)
    alone = [_step(1.0 + i, price, prefill=500, pid=1) for i in range(3)]
    beside = [_step(10.0 + i, 2 * price, prefill=500, pid=1) for i in range(5)]
    decodes = [_step(10.0 + i + 0.004 * k, 0.004, decodes=2, context=100, pid=2) for i in range(5) for k in range(60)]
    trace = alone + beside + decodes
    assert 2 * price < 60 * 0.004  # each slowed pass lies inside its run of decode steps
    assert fit_shared_gpu_prefill_slowdown(trace, profile, 0.0) == pytest.approx(0.5)
    assert fit_shared_gpu_prefill_slowdown(trace, profile, 2 * price) == 0.0  # host-bound: nothing lost beside
    assert sorted(s.start for s in passes_alone(trace)) == [1.0, 2.0, 3.0]
    assert fit_shared_gpu_prefill_slowdown(alone + decodes, profile, 0.0) == 0.0  # never beside: nothing to fit
    other = [_step(30.0, 0.1, prefill=100, pid=3)]
    assert fit_shared_gpu_prefill_slowdown(trace + other, profile, 0.0) == 0.0  # which pairs with which?
    assert passes_alone(trace + other) == trace + other
