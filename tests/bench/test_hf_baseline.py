"""The HF static-batch baseline runs every request to its own length and times each one."""

from __future__ import annotations

from splitserve.bench.hf_baseline import run_hf_baseline
from splitserve.bench.requests import BenchRequest
from splitserve.slo import SLO


def test_static_batches_cover_every_request(tiny_model_dir):
    requests = [BenchRequest(i, 0.0, list(range(1, 4 + 3 * i)), n) for i, n in enumerate((5, 1, 3))]
    summary, records = run_hf_baseline(tiny_model_dir, requests, batch_size=2, slo=SLO(), device="cpu")
    assert [r.index for r in records] == [0, 1, 2]
    assert summary.sent == summary.ok == 3 and summary.output_tokens == 9
    assert summary.rate is None and summary.duration_s > 0
    for r in records:
        assert r.ttft_ms is not None and r.e2e_ms is not None and r.ttft_ms <= r.e2e_ms
        assert (r.tpot_ms is None) == (r.max_tokens == 1)
    # Rows of one batch share its first step, and a shorter request finishes no later than a longer one.
    assert records[0].ttft_ms == records[1].ttft_ms and records[1].e2e_ms <= records[0].e2e_ms
