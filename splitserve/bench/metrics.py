"""Per-request measurements and what a run reports from them: percentiles, throughput, goodput under SLOs.

Pure functions over records, so the arithmetic is tested on synthetic latencies without a cluster.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from splitserve.slo import SLO

OK = "ok"
QUANTILES = (50, 90, 99)
MIN_ATTAINMENT = 0.9  # a rate "meets the SLOs" when at least this share of its requests does


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it; latencies are None when it failed (or, for TPOT, made one token)."""

    index: int
    prompt_tokens: int
    max_tokens: int
    status: str  # "ok", or the gRPC status name in lower case (resource_exhausted, unavailable, ...)
    output_tokens: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    kv_transfer_ms: float | None = None  # the server's: from the prompt's last prefill pass to the KV landed
    kv_exposed_ms: float | None = None  # of that, the part after the first token was sampled (not hidden by prefill)
    # First token to second at the client. Disaggregated, it holds what of the KV transfer the prefill did not hide,
    # plus the decode worker's admission; colocated, one decode step. None with fewer than two tokens.
    second_token_ms: float | None = None

    def meets(self, slo: SLO) -> bool:
        if self.status != OK or self.ttft_ms is None or self.ttft_ms > slo.ttft_ms:
            return False
        return self.tpot_ms is None or self.tpot_ms <= slo.tpot_ms  # one token: no gap to miss the target


def percentiles(values: Sequence[float], quantiles: Sequence[int] = QUANTILES) -> dict[str, float | None]:
    """``{"p50": ..., ...}`` with linear interpolation between samples; None for an empty sample."""
    if not values:
        return {f"p{q}": None for q in quantiles}
    points = np.percentile(np.asarray(values, dtype=np.float64), quantiles)
    return {f"p{q}": float(v) for q, v in zip(quantiles, points, strict=True)}


def _present(records: Sequence[RequestRecord], attr: str) -> list[float]:
    return [v for r in records if (v := getattr(r, attr)) is not None]


def _mean(records: Sequence[RequestRecord], attr: str) -> float | None:
    values = _present(records, attr)
    return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class Summary:
    """One run at one load: counts, rates over its duration, latency percentiles of the requests that finished."""

    label: str
    rate: float | None  # offered load in req/s; None for the static-batch baseline
    duration_s: float
    sent: int
    ok: int
    errors: dict[str, int]
    output_tokens: int
    throughput_tok_s: float
    throughput_req_s: float
    goodput_req_s: float
    slo_attainment: float
    ttft_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    second_token_ms: dict[str, float | None]
    mean_ttft_ms: float | None
    mean_kv_transfer_ms: float | None
    kv_share_of_ttft: float | None  # mean KV transfer time over mean TTFT
    mean_kv_exposed_ms: float | None
    kv_exposed_share_of_ttft: float | None  # mean exposed KV transfer time over mean TTFT
    slo: SLO = field(default_factory=SLO)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: SLO, label: str, rate: float | None) -> Summary:
    """Failed requests count as sent and as SLO misses; throughput counts only finished requests' tokens."""
    ok = [r for r in records if r.status == OK]
    good = sum(r.meets(slo) for r in records)
    ttfts = _present(ok, "ttft_ms")
    mean_ttft = float(np.mean(ttfts)) if ttfts else None
    mean_kv, mean_exposed = _mean(ok, "kv_transfer_ms"), _mean(ok, "kv_exposed_ms")
    tokens = sum(r.output_tokens for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return Summary(
        label=label,
        rate=rate,
        duration_s=duration_s,
        sent=len(records),
        ok=len(ok),
        errors=dict(Counter(r.status for r in records if r.status != OK)),
        output_tokens=tokens,
        throughput_tok_s=tokens * per_s,
        throughput_req_s=len(ok) * per_s,
        goodput_req_s=good * per_s,
        slo_attainment=good / len(records) if records else 0.0,
        ttft_ms=percentiles(ttfts),
        tpot_ms=percentiles(_present(ok, "tpot_ms")),
        e2e_ms=percentiles(_present(ok, "e2e_ms")),
        second_token_ms=percentiles(_present(ok, "second_token_ms")),
        mean_ttft_ms=mean_ttft,
        mean_kv_transfer_ms=mean_kv,
        kv_share_of_ttft=mean_kv / mean_ttft if mean_kv is not None and mean_ttft else None,
        mean_kv_exposed_ms=mean_exposed,
        kv_exposed_share_of_ttft=mean_exposed / mean_ttft if mean_exposed is not None and mean_ttft else None,
        slo=slo,
    )


def max_goodput(sweep: Sequence[Summary], min_attainment: float = MIN_ATTAINMENT) -> Summary | None:
    """The run at the highest offered rate whose SLO attainment is at least ``min_attainment``; None if none is."""
    passing = [s for s in sweep if s.rate is not None and s.slo_attainment >= min_attainment]
    return max(passing, key=lambda s: s.rate or 0.0, default=None)
