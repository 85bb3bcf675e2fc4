"""The request schedule: Poisson arrivals reproducible from a seed, the same prompts at every rate, trace input."""

from __future__ import annotations

import numpy as np

from splitserve.bench.requests import PROMPT_VOCAB, WorkloadSpec, make_requests
from splitserve.bench.sweep import warmup_requests
from splitserve.simulator.workload import LengthDist


def _spec(seed: int = 0, trace: str | None = None) -> WorkloadSpec:
    return WorkloadSpec(
        num_requests=50,
        prompt=LengthDist("uniform", 10, 100),
        output=LengthDist("lognormal", 20, 0.5),
        seed=seed,
        trace=trace,
    )


def test_poisson_schedule_is_deterministic_with_a_seed():
    a, b = _spec(seed=3).workload(2.0), _spec(seed=3).workload(2.0)
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.arrival_s, _spec(seed=4).workload(2.0).arrival_s)
    assert a.arrival_s[0] == 0.0 and np.all(np.diff(a.arrival_s) >= 0)


def test_rates_change_only_the_arrivals():
    slow, fast = _spec().workload(1.0), _spec().workload(4.0)
    np.testing.assert_allclose(fast.arrival_s * 4, slow.arrival_s)
    np.testing.assert_array_equal(slow.prompt_tokens, fast.prompt_tokens)
    np.testing.assert_array_equal(slow.output_tokens, fast.output_tokens)
    r_slow = make_requests(slow, max_model_len=4096, seed=0)
    assert [r.prompt_token_ids for r in make_requests(fast, max_model_len=4096, seed=0)] == [
        r.prompt_token_ids for r in r_slow
    ]


def test_each_run_of_a_sweep_gets_its_own_prompt_tokens():
    """Else every run after the first would be all prefix-cache hits of the one before."""
    workload = _spec().workload(1.0)
    first, second = (make_requests(workload, max_model_len=4096, seed=0, run=i) for i in (0, 1))
    assert [len(r.prompt_token_ids) for r in first] == [len(r.prompt_token_ids) for r in second]
    assert all(a.prompt_token_ids[:16] != b.prompt_token_ids[:16] for a, b in zip(first, second, strict=True))


def test_the_warmup_shares_its_requests_shapes_not_their_prompts():
    """Else the first run's first requests would be prefix-cache hits of the warmup's, prefilling a few tokens."""
    workload = _spec().workload(1.0)
    warm = warmup_requests(workload, max_model_len=4096, seed=0, n=2)
    first = make_requests(workload, max_model_len=4096, seed=0, run=0)[:2]
    assert [r.arrival_s for r in warm] == [0.0, 0.0]
    assert [len(r.prompt_token_ids) for r in warm] == [len(r.prompt_token_ids) for r in first]
    assert all(w.prompt_token_ids[:16] != r.prompt_token_ids[:16] for w, r in zip(warm, first, strict=True))


def test_requests_have_the_workload_lengths_and_fit_the_context():
    workload = _spec().workload(1.0)
    requests = make_requests(workload, max_model_len=4096)
    assert [len(r.prompt_token_ids) for r in requests] == workload.prompt_tokens.tolist()
    assert [r.max_tokens for r in requests] == workload.output_tokens.tolist()
    assert all(0 <= t < PROMPT_VOCAB for r in requests for t in r.prompt_token_ids)
    clipped = make_requests(workload, max_model_len=64)
    assert all(len(r.prompt_token_ids) + r.max_tokens <= 64 and r.max_tokens >= 1 for r in clipped)


def test_trace_keeps_its_lengths_and_is_stretched_to_the_rate(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,100,5\n1,200,6\n3,300,7\n")
    spec = _spec(trace=str(path))
    native, faster = spec.workload(None), spec.workload(2.0)
    assert native.arrival_s.tolist() == [0.0, 1.0, 3.0]
    np.testing.assert_allclose(faster.arrival_s, [0.0, 1 / 3, 1.0])  # mean rate 2/3 req/s → 2 req/s: 3× faster
    assert faster.prompt_tokens.tolist() == [100, 200, 300]
