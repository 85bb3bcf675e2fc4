"""A request's RequestTiming turned into the latencies clients and metrics report, in milliseconds."""

from __future__ import annotations

import time
from dataclasses import dataclass

from splitserve.cluster.messages import RequestTiming


@dataclass(frozen=True)
class TimingSummary:
    ttft_ms: float | None
    tpot_ms: float | None  # None with fewer than two tokens: there is no inter-token gap to measure
    e2e_ms: float
    kv_transfer_ms: float | None
    kv_exposed_ms: float | None  # the part of the transfer after the first token was sampled
    cached_prompt_tokens: int | None  # prompt tokens served from the prefill worker's prefix cache
    kv_transfer_bytes: int | None
    prefill_worker: str | None
    decode_worker: str | None
    retries: int

    @classmethod
    def of(cls, timing: RequestTiming, completion_tokens: int) -> TimingSummary:
        end = timing.finished if timing.finished is not None else time.monotonic()
        ttft = None if timing.first_token is None else (timing.first_token - timing.arrival) * 1000
        tpot = None
        if timing.first_token is not None and completion_tokens > 1:
            tpot = (end - timing.first_token) * 1000 / (completion_tokens - 1)
        return cls(
            ttft_ms=ttft,
            tpot_ms=tpot,
            e2e_ms=(end - timing.arrival) * 1000,
            kv_transfer_ms=None if timing.kv_transfer_s is None else timing.kv_transfer_s * 1000,
            kv_exposed_ms=None if timing.kv_exposed_s is None else timing.kv_exposed_s * 1000,
            cached_prompt_tokens=timing.cached_prompt_tokens,
            kv_transfer_bytes=timing.kv_transfer_bytes,
            prefill_worker=timing.prefill_worker,
            decode_worker=timing.decode_worker,
            retries=timing.retries,
        )
