"""Percentiles, throughput, goodput and max-goodput arithmetic on synthetic records (no cluster)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from splitserve.bench.metrics import RequestRecord, max_goodput, percentiles, summarize
from splitserve.slo import SLO

SLO_DEFAULT = SLO(ttft_ms=1000.0, tpot_ms=50.0)


def _ok(
    i: int, ttft: float, tpot: float | None, tokens: int = 10, kv: float | None = None, exposed: float | None = None
) -> RequestRecord:
    e2e = ttft + (tpot or 0.0) * (tokens - 1)
    return RequestRecord(i, 100, tokens, "ok", tokens, ttft, tpot, e2e, kv, exposed)


def test_percentiles_interpolate_linearly_between_samples():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentiles(values) == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})


def test_percentiles_ignore_order_and_handle_one_or_no_sample():
    assert percentiles([30.0, 10.0, 20.0], (0, 50, 100)) == {"p0": 10.0, "p50": 20.0, "p100": 30.0}
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_goodput_counts_requests_meeting_both_slos_and_failures_as_misses():
    records = [
        _ok(0, ttft=200, tpot=20),  # meets both
        _ok(1, ttft=999, tpot=50),  # meets both (targets are inclusive)
        _ok(2, ttft=1500, tpot=20),  # TTFT miss
        _ok(3, ttft=100, tpot=80),  # TPOT miss
        _ok(4, ttft=100, tpot=None, tokens=1),  # one token: no gap, so only TTFT counts
        RequestRecord(5, 100, 10, "resource_exhausted"),
    ]
    s = summarize(records, duration_s=2.0, slo=SLO_DEFAULT, label="x", rate=3.0)
    assert (s.sent, s.ok, s.errors) == (6, 5, {"resource_exhausted": 1})
    assert s.output_tokens == 41
    assert s.throughput_tok_s == pytest.approx(20.5)
    assert s.throughput_req_s == pytest.approx(2.5)
    assert s.goodput_req_s == pytest.approx(1.5)  # 3 good requests over 2 s
    assert s.slo_attainment == pytest.approx(0.5)
    assert s.ttft_ms["p50"] == pytest.approx(200.0)  # over the 5 finished requests only
    assert s.tpot_ms["p50"] == pytest.approx(35.0)  # the one-token request has no TPOT


def test_kv_shares_are_mean_transfer_and_mean_exposed_part_over_mean_ttft():
    records = [_ok(0, ttft=100, tpot=10, kv=10, exposed=1), _ok(1, ttft=300, tpot=10, kv=30, exposed=5)]
    s = summarize(records, 1.0, SLO_DEFAULT, "x", 1.0)
    assert (s.mean_ttft_ms, s.mean_kv_transfer_ms, s.kv_share_of_ttft) == pytest.approx((200.0, 20.0, 0.1))
    assert (s.mean_kv_exposed_ms, s.kv_exposed_share_of_ttft) == pytest.approx((3.0, 0.015))
    colocated = summarize([_ok(0, ttft=100, tpot=10)], 1.0, SLO_DEFAULT, "x", 1.0)
    assert colocated.kv_share_of_ttft is None and colocated.kv_exposed_share_of_ttft is None


def test_second_token_gap_percentiles_skip_one_token_requests():
    records = [replace(_ok(i, ttft=100, tpot=10), second_token_ms=float(g)) for i, g in enumerate([10, 20, 30])]
    records.append(_ok(3, ttft=100, tpot=None, tokens=1))
    s = summarize(records, 1.0, SLO_DEFAULT, "x", 1.0)
    assert s.second_token_ms["p50"] == pytest.approx(20.0)
    assert s.second_token_ms["p99"] == pytest.approx(29.8)


def test_max_goodput_is_the_highest_rate_with_ninety_percent_attainment():
    def run(rate: float, good: int) -> object:
        records = [_ok(i, ttft=100 if i < good else 5000, tpot=10) for i in range(10)]
        return summarize(records, 10.0, SLO_DEFAULT, "x", rate)

    sweep = [run(1, 10), run(2, 9), run(4, 6), run(8, 9)]  # not monotone: the best passing rate wins
    best = max_goodput(sweep)
    assert best is not None and best.rate == 8
    assert max_goodput([run(1, 8)]) is None
