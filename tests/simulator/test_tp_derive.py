"""A tp=N profile derived from a measured tp=1 one: faster where tp splits the work, labelled derived, and never
taken for a measurement."""

from __future__ import annotations

import pytest

from splitserve.simulator.cluster import ClusterSpec, PoolSpec
from splitserve.simulator.engine import simulate
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.metrics import summarize
from splitserve.simulator.profile import load_profile
from splitserve.simulator.profile_run import render, write_checked
from splitserve.simulator.tp_derive import derive_tp, fixed_pass_s, header
from splitserve.simulator.workload import LengthDist, synthetic
from splitserve.slo import SLO
from tests.simulator.conftest import LLAMA3_8B, PROFILES


def test_a_derived_tp2_profile_is_faster_than_tp1_and_labelled_derived(h100, tmp_path):
    tp2 = derive_tp(h100, 2, LLAMA3_8B, "llama3-8b-h100.yaml")
    assert all(a < b for a, b in zip(tp2.prefill.seconds, h100.prefill.seconds, strict=True))
    assert tp2.prefill_time(8192) < 0.7 * h100.prefill_time(8192)  # compute-bound: close to 1 / (2 x 0.9)
    assert tp2.decode_step_time(64, 64 * 1000) < h100.decode_step_time(64, 64 * 1000)
    assert tp2.kv_capacity_tokens > 2 * h100.kv_capacity_tokens  # twice the memory, less of it holding weights
    assert tp2.tensor_parallel_size == 2 and tp2.derived and not h100.derived
    assert tp2.derived_from is not None and tp2.derived_from.profile == "llama3-8b-h100.yaml"
    assert tp2.gpu == h100.gpu and tp2.kv_transfer == h100.kv_transfer and tp2.serving == h100.serving
    # Written and read back, it is still marked derived, with what it assumed.
    path = tmp_path / "tp2.yaml"
    back = write_checked(render(tp2, header(tp2, "test")), path)
    assert back.derived_from == tp2.derived_from
    assert path.read_text().startswith("# DERIVED for planning, NOT MEASURED")


def test_the_model_adds_an_all_reduce_per_layer_twice_and_keeps_the_fixed_cost(h100):
    slow_link = LLAMA3_8B.model_copy(update={"prefill_efficiency": 1.0, "link_latency_s": 1e-3})
    tp2 = derive_tp(h100, 2, slow_link, "h100")
    fixed = fixed_pass_s(h100, slow_link)
    assert 0 < fixed < h100.decode.base_s
    one_token = fixed + (h100.prefill.seconds[0] - fixed) / 2 + 65 * (1e-3 + 1 * 4096 * 2 / 3.6e11)
    assert tp2.prefill.seconds[0] == pytest.approx(one_token)
    assert tp2.decode.base_s == pytest.approx(fixed + (h100.decode.base_s - fixed) / 2 + 65e-3)


def test_kv_heads_are_split_no_finer_than_one_a_rank(h100):
    two_heads = LLAMA3_8B.model_copy(update={"kv_heads": 2})
    tp4 = derive_tp(h100, 4, two_heads, "h100")
    assert tp4.decode.per_context_token_s == pytest.approx(h100.decode.per_context_token_s / 2)
    eight = derive_tp(h100, 4, LLAMA3_8B, "h100")
    assert eight.decode.per_context_token_s == pytest.approx(h100.decode.per_context_token_s / 4)
    assert tp4.kv_capacity_tokens == pytest.approx(eight.kv_capacity_tokens / 2, rel=1e-6)


def test_only_a_measured_tp1_profile_is_derived_from(h100):
    tp2 = derive_tp(h100, 2, LLAMA3_8B, "h100")
    with pytest.raises(SimInputError, match="derived"):
        derive_tp(tp2, 4, LLAMA3_8B, "tp2")
    with pytest.raises(SimInputError, match="--tp"):
        derive_tp(h100, 1, LLAMA3_8B, "h100")


def test_a_tp_worker_counts_its_gpus_in_cost_and_energy(h100):
    tp2 = derive_tp(h100, 2, LLAMA3_8B, "h100")
    cluster = ClusterSpec("disaggregated", PoolSpec(1, tp2), PoolSpec(3, h100))
    assert cluster.gpus == 5 and cluster.cost_per_hour == pytest.approx(5 * h100.gpu.cost_per_hour)
    wl = synthetic(rate=4, num_requests=100, prompt=LengthDist("fixed", 1000), output=LengthDist("fixed", 20))
    lone = ClusterSpec("colocated", PoolSpec(1, tp2))
    m = summarize(simulate(lone, wl), SLO())
    busy = m.utilisation["colocated"] * m.makespan_s
    joules = 2 * (busy * h100.gpu.power_w + (m.makespan_s - busy) * h100.gpu.idle_power_w)
    assert m.gpus == 2 and m.joules_per_output_token == pytest.approx(joules / wl.output_tokens.sum())


def test_shipped_derived_profiles_are_what_their_recorded_assumptions_give():
    measured = {p.name: load_profile(p) for p in PROFILES.glob("*.yaml") if not load_profile(p).derived}
    derived = [load_profile(p) for p in PROFILES.glob("*.yaml") if load_profile(p).derived]
    assert derived
    for prof in derived:
        src = prof.derived_from
        assert src is not None
        again = derive_tp(measured[src.profile.rsplit("/", 1)[-1]], prof.tensor_parallel_size, src.assumptions, "")
        assert prof.prefill.seconds == pytest.approx(again.prefill.seconds, rel=1e-3)
        assert prof.decode.base_s == pytest.approx(again.decode.base_s, rel=1e-3)
        assert prof.kv_capacity_tokens == again.kv_capacity_tokens


def test_pools_sharing_gpus_need_tp1_workers(h100):
    tp2 = derive_tp(h100, 2, LLAMA3_8B, "h100")
    with pytest.raises(SimInputError, match="tensor_parallel_size 1"):
        ClusterSpec("disaggregated", PoolSpec(1, tp2), PoolSpec(1, tp2), shared_gpus=True)
