"""Analytic checks of the event simulation: closed forms it must reproduce, invariants, determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from splitserve.cluster.router import PREFILL_BACKLOG_TOKENS
from splitserve.simulator.cluster import ClusterSpec, PoolSpec
from splitserve.simulator.engine import simulate
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.metrics import summarize
from splitserve.simulator.workload import LengthDist, Workload, synthetic
from splitserve.slo import SLO
from tests.simulator.conftest import make_profile


def _wl(rate: float, n: int, prompt="lognormal:800:0.7", output="lognormal:150:0.7", seed=0, **kw) -> Workload:
    return synthetic(
        rate=rate,
        num_requests=n,
        prompt=LengthDist.parse(prompt, "p"),
        output=LengthDist.parse(output, "o"),
        seed=seed,
        **kw,
    )


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_same_seed_same_metrics_and_every_request_finishes(h100, mode):
    cluster = ClusterSpec(mode, PoolSpec(2, h100), PoolSpec(2, h100))
    runs = [summarize(simulate(cluster, _wl(30, 3000, seed=7, arrival="gamma", cv=2.0)), SLO()) for _ in range(2)]
    assert runs[0] == runs[1]
    other = summarize(simulate(cluster, _wl(30, 3000, seed=8, arrival="gamma", cv=2.0)), SLO())
    assert other != runs[0]
    r = simulate(cluster, _wl(30, 3000, seed=7))
    assert not np.isnan(r.finish_s).any()
    assert (r.first_token_s > r.workload.arrival_s).all()
    assert (r.finish_s >= r.first_token_s).all()


def test_low_load_has_no_queueing(toy):
    """Requests 10 s apart never meet: TTFT = prefill(L); the last token = + the transfer's latency (its 1 ms of
    bytes stream during the 20 ms pass) + (out - 1) decode steps."""
    L, out = 1000, 5
    wl = Workload(np.arange(50) * 10.0, np.full(50, L), np.full(50, out))
    r = simulate(ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, toy)), wl)
    np.testing.assert_allclose(r.first_token_s - wl.arrival_s, toy.prefill_time(L))
    decode = sum(toy.decode_step_time(1, L + k) for k in range(1, out))
    latency = toy.kv_transfer["nccl"].latency_s
    assert toy.transfer_time(L, "nccl") - latency < toy.prefill_time(L)
    np.testing.assert_allclose(r.finish_s - wl.arrival_s, toy.prefill_time(L) + latency + decode)


def _with_link(profile, bandwidth_bytes_per_s: float):
    link = profile.kv_transfer["nccl"].model_copy(update={"bandwidth_bytes_per_s": bandwidth_bytes_per_s})
    return profile.model_copy(update={"kv_transfer": {"nccl": link}})


def test_kv_bytes_stream_during_the_pass_and_queue_on_the_links_they_share(toy):
    """A link slower than the pass: a request's KV lands its bytes' time after the pass began (plus the latency),
    not after it ended; transfers that share a link, the prefill worker's (its two passes in a row, to two decode
    workers) or the decode worker's (from two prefill workers), go one after the other."""
    slow = _with_link(toy, 1e7)  # 1000 tokens x 1000 B: 0.1 s on the link, against a 20 ms pass of one prompt
    latency, bytes_s = 0.001, 0.1
    wl = Workload(np.zeros(2), np.full(2, 1000), np.full(2, 2))

    def kv_landed(prefill: int, decode: int) -> np.ndarray:
        r = simulate(ClusterSpec("disaggregated", PoolSpec(prefill, slow), PoolSpec(decode, slow)), wl)
        return np.sort(r.finish_s - slow.decode_step_time(1, 1001))  # each decodes its one token alone

    np.testing.assert_allclose(kv_landed(1, 2), [bytes_s + latency, 2 * bytes_s + latency])  # one egress link
    np.testing.assert_allclose(kv_landed(2, 1), [bytes_s + latency, 2 * bytes_s + latency])  # one ingress link
    np.testing.assert_allclose(kv_landed(2, 2), [bytes_s + latency] * 2)  # links of their own
    fast = _with_link(toy, 1e12)
    r = simulate(ClusterSpec("disaggregated", PoolSpec(1, fast), PoolSpec(2, fast)), wl)
    pass_s = fast.prefill_time(1000)  # one pass after the other; each one's bytes are out long before it ends
    np.testing.assert_allclose(r.finish_s - fast.decode_step_time(1, 1001), [pass_s + latency, 2 * pass_s + latency])


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_serving_overhead_adds_its_latency_once_and_its_step_cost_to_every_step(toy, mode):
    """request_s delays every token of a request alike; step_s lengthens every prefill pass and decode step."""
    L, out, request_s, step_s = 1000, 5, 0.02, 0.003
    wl = Workload(np.arange(20) * 10.0, np.full(20, L), np.full(20, out))
    served = toy.model_copy(
        update={"serving": toy.serving.model_copy(update={"request_s": request_s, "step_s": step_s})}
    )

    def run(profile):
        return simulate(ClusterSpec(mode, PoolSpec(1, profile), PoolSpec(1, profile)), wl)

    bare, r = run(toy), run(served)
    np.testing.assert_allclose(r.first_token_s - bare.first_token_s, request_s + step_s)
    np.testing.assert_allclose(r.finish_s - bare.finish_s, request_s + out * step_s)


def test_mixed_extra_lengthens_only_steps_with_a_chunk_and_decodes(toy):
    """A lone prompt is a chunk-only step (no extra); a prompt arriving while another request decodes shares a mixed
    step, whose extra delays its first token and the running request's next token alike."""
    mixed = toy.model_copy(update={"mixed": toy.mixed.model_copy(update={"extra_s": 0.004})})
    lone = Workload(np.arange(5) * 10.0, np.full(5, 500), np.full(5, 20))
    beside = Workload(np.array([0.0, 0.05]), np.array([500, 500]), np.array([100, 2]))

    def run(profile, wl):
        return simulate(ClusterSpec("colocated", PoolSpec(1, profile)), wl)

    np.testing.assert_allclose(run(mixed, lone).finish_s, run(toy, lone).finish_s)
    bare, r = run(toy, beside), run(mixed, beside)
    assert r.first_token_s[0] == bare.first_token_s[0]  # request 0's prompt ran alone
    np.testing.assert_allclose(r.first_token_s[1] - bare.first_token_s[1], 0.004)
    np.testing.assert_allclose(r.finish_s[0] - bare.finish_s[0], 0.004)  # its one mixed step, among 99 decode steps


def test_poisson_low_load_ttft_is_prefill_time(h100):
    """Closed form for a lightly loaded M/D/1 prefill server: TTFT ~ prefill time (utilisation ~1%)."""
    wl = _wl(0.5, 2000, prompt="512", output="16", seed=2)
    r = simulate(ClusterSpec("disaggregated", PoolSpec(1, h100), PoolSpec(1, h100)), wl)
    ttft = r.first_token_s - wl.arrival_s
    assert np.median(ttft) == pytest.approx(h100.prefill_time(512), rel=1e-9)
    assert ttft.mean() == pytest.approx(h100.prefill_time(512), rel=0.02)


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_prefill_queue_matches_pollaczek_khinchine(toy, rho):
    """Batch size 1, fixed prompts, Poisson arrivals: an M/D/1 queue; mean wait = rho * D / (2 (1 - rho))."""
    L = 2000
    service = toy.prefill_time(L)
    wl = _wl(rho / service, 60_000, prompt=str(L), output="1", seed=11)
    cluster = ClusterSpec("disaggregated", PoolSpec(1, toy, max_batch_requests=1), PoolSpec(1, toy))
    r = simulate(cluster, wl)
    wait = (r.first_token_s - wl.arrival_s) - service
    assert wait.mean() == pytest.approx(rho * service / (2 * (1 - rho)), rel=0.08)
    assert summarize(r, SLO()).utilisation["prefill"] == pytest.approx(rho, rel=0.03)


def test_prepacking_respects_the_token_budget(toy):
    """A burst of 10 prompts of 300 tokens, 1000-token budget: the first starts alone on an idle worker, the
    other nine queue behind it and run as three batches of 3."""
    wl = Workload(np.zeros(10), np.full(10, 300), np.full(10, 1))
    r = simulate(ClusterSpec("disaggregated", PoolSpec(1, toy, max_batch_tokens=1000), PoolSpec(1, toy)), wl)
    ends = np.unique(r.first_token_s)
    b3, b1 = toy.prefill_time(900), toy.prefill_time(300)
    np.testing.assert_allclose(ends, [b1, b1 + b3, b1 + 2 * b3, b1 + 3 * b3])


def test_more_decode_replicas_never_raise_tpot(h100):
    wl = _wl(40, 4000, seed=5)
    tpot, busy = [], []
    for d in (1, 2, 3, 4):
        m = summarize(simulate(ClusterSpec("disaggregated", PoolSpec(3, h100), PoolSpec(d, h100)), wl), SLO())
        tpot.append(m.tpot_s.mean)
        busy.append(m.utilisation["decode"])
    assert all(b <= a * 1.001 for a, b in itertools.pairwise(tpot)), tpot
    assert all(b < a for a, b in itertools.pairwise(busy)), busy


def test_kv_capacity_limits_the_batch(toy):
    """KV for two requests at a time: the third to finish cannot have started before the first finished."""
    small = make_profile(kv_capacity=2 * (100 + 50))
    wl = Workload(np.zeros(8), np.full(8, 100), np.full(8, 50))
    roomy = simulate(ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, toy)), wl)
    tight = simulate(ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, small)), wl)
    f = np.sort(tight.finish_s)
    assert (f[2:] - f[:-2] >= 49 * small.decode_step_time(1, 100)).all()
    assert roomy.finish_s.max() < tight.finish_s.max() / 2


def test_colocated_chunked_prefill_interleaves_decode(h100):
    """A long prompt arriving mid-decode is chunked: the running request keeps producing tokens meanwhile."""
    wl = Workload(np.array([0.0, 0.05]), np.array([100, 16_000]), np.array([200, 2]))
    r = simulate(ClusterSpec("colocated", PoolSpec(1, h100, max_batch_tokens=2048)), wl)
    # the 16k prompt needs 8 chunks; request 0's tokens keep flowing, so it cannot be stalled for the whole prefill
    assert r.finish_s[0] < r.first_token_s[1] + 200 * h100.decode_step_time(1, 300)
    assert r.first_token_s[1] - 0.05 > 7 * h100.prefill_time(2048)


def test_summary_accounts_cost_and_energy(toy):
    wl = _wl(5, 500, seed=1)
    cluster = ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(2, toy))
    r = simulate(cluster, wl)
    m = summarize(r, SLO(ttft_ms=500, tpot_ms=20))
    hours = m.makespan_s / 3600
    assert m.cost_per_m_output_tokens == pytest.approx(3 * hours / wl.output_tokens.sum() * 1e6)
    idle_j = 3 * m.makespan_s * 50
    busy_s = sum(r.busy_s.values())
    assert m.joules_per_output_token * wl.output_tokens.sum() == pytest.approx(idle_j + busy_s * 450)
    assert 0 < m.slo_attainment <= 1 and m.goodput_rps <= m.requests_per_s


def _burst(n: int = 30, prompt: int = 1000, out: int = 20) -> Workload:
    """Prompts arriving together: the prefill backlog passes the router's overload line after 9 of them."""
    return Workload(np.zeros(n), np.full(n, prompt), np.full(n, out))


def test_a_hybrid_pool_runs_the_prompts_a_backed_up_prefill_pool_would_queue(toy):
    wl = _burst()
    split = ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, toy))
    with_hybrid = ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, toy), hybrid=PoolSpec(1, toy))
    plain, r = simulate(split, wl), simulate(with_hybrid, wl)
    backlog = PREFILL_BACKLOG_TOKENS // 1000 + 1  # prompts queued at the prefill worker before overflow
    assert not np.isnan(r.finish_s).any()
    assert r.busy_s["hybrid"] > 0 and r.busy_s["prefill"] < plain.busy_s["prefill"]
    # The first `backlog` prompts went through prefill exactly as without the hybrid pool; the rest did not wait
    # for them.
    np.testing.assert_allclose(r.first_token_s[:backlog], plain.first_token_s[:backlog])
    assert r.first_token_s[backlog:].max() < plain.first_token_s[backlog:].max()
    m = summarize(r, SLO())
    assert set(m.utilisation) == {"prefill", "decode", "hybrid"} and m.gpus == 3


def test_the_borrow_idle_policy_lets_an_idle_decode_worker_prefill_and_changes_nothing_below_the_line(toy):
    def run(policy, wl):
        return simulate(ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, toy), policy=policy), wl)

    burst = _burst()
    jsq, borrow = run("jsq", burst), run("borrow_idle", burst)
    assert borrow.first_token_s.max() < jsq.first_token_s.max()
    assert borrow.busy_s["prefill"] < jsq.busy_s["prefill"]  # some prompts ran on the decode worker instead
    calm = _wl(2, 2000, prompt="500", output="20", seed=4)  # the backlog never nears 8192 tokens
    base, same = run("jsq", calm), run("borrow_idle", calm)
    np.testing.assert_array_equal(base.first_token_s, same.first_token_s)
    np.testing.assert_array_equal(base.finish_s, same.finish_s)


def test_a_per_prompt_token_latency_delays_each_request_by_its_own_prompt(toy):
    prompts = np.array([100, 400, 1600])
    wl = Workload(np.arange(3) * 10.0, prompts, np.full(3, 4))
    served = toy.model_copy(update={"serving": toy.serving.model_copy(update={"prompt_token_s": 1e-5})})

    def run(profile):
        return simulate(ClusterSpec("colocated", PoolSpec(1, profile)), wl)

    bare, r = run(toy), run(served)
    np.testing.assert_allclose(r.first_token_s - bare.first_token_s, prompts * 1e-5)
    np.testing.assert_allclose(r.finish_s - bare.finish_s, prompts * 1e-5)


def test_with_overlapped_steps_a_prompt_step_holds_back_the_tokens_of_the_step_before_it(toy):
    """The runtime reads a step's tokens back once the next step is launched, and a step with a prompt chunk takes
    about its whole time to launch: a request that ends in the step before one waits for it to end."""
    # Request 0 (10-token prompt, 2 tokens) ends in its one decode step; request 1 arrives during that step.
    wl = Workload(np.array([0.0, 0.012]), np.array([10, 500]), np.array([2, 2]))

    def run(overlap: bool):
        return simulate(ClusterSpec("colocated", PoolSpec(1, toy, overlap_decode=overlap)), wl)

    plain, overlapped = run(False), run(True)
    prefill, decode = toy.prefill_time(10), toy.decode_step_time(1, 11)
    np.testing.assert_allclose(plain.first_token_s[0], prefill)
    np.testing.assert_allclose(plain.finish_s[0], prefill + decode)
    assert overlapped.first_token_s[0] == plain.first_token_s[0]  # the step after the prompt's was a decode step
    np.testing.assert_allclose(overlapped.finish_s[0], prefill + decode + toy.prefill_time(500))
    np.testing.assert_allclose(overlapped.first_token_s[1], plain.first_token_s[1])  # its own step is unchanged


def _with_serving(profile, **serving):
    return profile.model_copy(update={"serving": profile.serving.model_copy(update=serving)})


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_an_ingress_delays_a_request_that_finds_its_worker_idle_by_itself(toy, mode):
    wl = Workload(np.arange(5) * 10.0, np.full(5, 700), np.full(5, 4))

    def run(profile):
        return simulate(ClusterSpec(mode, PoolSpec(1, profile, overlap_decode=True), PoolSpec(1, profile)), wl)

    bare, late = run(toy), run(_with_serving(toy, ingress_s=0.004))
    np.testing.assert_allclose(late.first_token_s - bare.first_token_s, 0.004)
    np.testing.assert_allclose(late.finish_s - bare.finish_s, 0.004)


def test_a_request_reaching_a_colocated_worker_during_a_prompt_step_waits_for_the_step_after_it(toy):
    """Admission into a stepping worker runs while the engine waits for the device, which an eager prompt launch
    never does: a request that comes during one is admitted once it ends, after the next step has been launched."""
    ingress = 0.002
    wl = Workload(np.array([0.0, 0.005]), np.array([500, 100]), np.array([4, 4]))

    def run(profile):
        return simulate(ClusterSpec("colocated", PoolSpec(1, profile, overlap_decode=True)), wl)

    late, bare = run(_with_serving(toy, ingress_s=ingress)), run(toy)
    prompt_end = ingress + toy.prefill_time(500)  # request 1 reached the worker at 7 ms, during it
    decode = toy.decode_step_time(1, 501)  # the step after it: request 0's first decode, alone
    assert late.first_token_s[0] == pytest.approx(prompt_end)  # not held back: the step after it had no prompt
    np.testing.assert_allclose(late.first_token_s[1], prompt_end + decode + toy.step_time(100, 1, 502), rtol=1e-6)
    # With no ingress it would have joined the step right after request 0's, holding request 0's first token back.
    assert bare.first_token_s[0] == pytest.approx(toy.prefill_time(500) + toy.step_time(100, 1, 501))


def test_a_request_reaching_a_prefill_worker_during_a_batch_joins_the_next_one(toy):
    """A prefill worker queues requests between its batches: no wait beyond the batch in flight."""
    wl = Workload(np.array([0.0, 0.005]), np.array([1000, 100]), np.array([4, 4]))
    served = _with_serving(toy, ingress_s=0.002)
    r = simulate(ClusterSpec("disaggregated", PoolSpec(1, served), PoolSpec(1, served)), wl)
    batch_end = 0.002 + toy.prefill_time(1000)
    np.testing.assert_allclose(r.first_token_s, [batch_end, batch_end + toy.prefill_time(100)])


def test_a_prefill_pass_that_starts_while_its_gpus_decode_worker_steps_gets_part_of_the_device(toy):
    """Request 1's prompt comes while request 0 decodes on the same GPU: its pass takes its device time over
    (1 - slowdown), at least the prompt-step floor; request 0's came to an idle GPU and took its price. Apart, or
    with the floor above the slowed pass (host-bound), the pass takes what it takes alone."""
    price = toy.prefill_time(1000)

    def first_tokens(later, shared, **serving):
        wl = Workload(np.array([0.0, later]), np.array([1000, 1000]), np.array([50, 2]))
        profile = _with_serving(toy, shared_gpu_prefill_slowdown=0.5, **serving)
        cluster = ClusterSpec("disaggregated", PoolSpec(1, profile), PoolSpec(1, profile), shared_gpus=shared)
        return simulate(cluster, wl).first_token_s

    decoding_until = 3 * price + toy.transfer_time(1000, "nccl") + 49 * toy.decode_step_time(1, 1000)
    assert 4 * price < decoding_until  # request 0 still decodes when request 1 comes, in every case below
    later = 2 * price
    np.testing.assert_allclose(first_tokens(later, True), [price, later + price / 0.5])
    np.testing.assert_allclose(first_tokens(later, False), [price, later + price])
    floor, later = 3 * price, 4 * price
    np.testing.assert_allclose(first_tokens(later, True, prompt_step_floor_s=floor), [floor, later + floor])


def test_pools_sharing_gpus_count_each_gpu_once_and_slow_a_decode_step_beside_a_prefill_pass(toy):
    """Request 0 decodes while request 1's long prompt is prefilled on the same GPU: each of its decode steps runs
    at (1 - slowdown) of its speed, so its decode takes 1 / (1 - slowdown) as long; apart, nothing changes."""
    wl = Workload(np.array([0.0, 0.0105]), np.array([10, 9000]), np.array([3, 3]))
    slowed = _with_serving(toy, shared_gpu_slowdown=0.5)

    def run(profile, shared):
        cluster = ClusterSpec("disaggregated", PoolSpec(1, profile), PoolSpec(1, profile), shared_gpus=shared)
        return cluster, simulate(cluster, wl)

    (apart_spec, apart), (shared_spec, shared) = run(slowed, False), run(slowed, True)
    assert toy.prefill_time(9000) > 0.09  # request 1's prefill covers request 0's two decode steps
    np.testing.assert_allclose(shared.first_token_s, apart.first_token_s)
    xfer = 0.001  # its KV's way to the decode worker, before its first decode step (its bytes went during the pass)
    steps_apart = apart.finish_s[0] - apart.first_token_s[0] - xfer
    np.testing.assert_allclose(shared.finish_s[0] - shared.first_token_s[0] - xfer, steps_apart / (1 - 0.5))
    assert (shared_spec.gpus, apart_spec.gpus) == (1, 2)
    assert shared_spec.cost_per_hour == pytest.approx(apart_spec.cost_per_hour / 2)
    m = summarize(shared, SLO())
    busy_s = sum(shared.busy_s.values())
    idle_j = max(0.0, m.makespan_s - busy_s) * 50  # one GPU idles once, while neither pool is busy
    assert m.joules_per_output_token * wl.output_tokens.sum() == pytest.approx(idle_j + busy_s * 500)
    with pytest.raises(SimInputError, match="shared-gpus"):
        ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(2, toy), shared_gpus=True)


def test_the_old_policy_name_is_an_error_naming_the_new_one(toy):
    with pytest.raises(SimInputError, match="'mixed' is now called 'borrow_idle'"):
        ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, toy), policy="mixed")  # type: ignore[arg-type]


def test_borrow_idle_routes_like_jsq_not_round_robin(toy):
    """Two decode workers: a long request on worker 0, then two short ones; jsq and borrow_idle send both short ones
    to the idle worker 1 only while it stays the lighter, round robin alternates regardless."""
    wl = Workload(np.array([0.0, 0.001, 0.002]), np.array([100, 100, 100]), np.array([2000, 5, 5]))

    def workers(policy):
        cluster = ClusterSpec("colocated", PoolSpec(2, toy), policy=policy)
        return simulate(cluster, wl).finish_s

    np.testing.assert_array_equal(workers("jsq"), workers("borrow_idle"))
    assert not np.array_equal(workers("jsq"), workers("round_robin"))
