"""Prometheus metrics of the API layer; each server owns its registry so two servers in one process never clash."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from splitserve.server.timing import TimingSummary

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "splitserve_requests", "Finished requests by API and status.", ["api", "status"], registry=self.registry
        )
        self.inflight = Gauge("splitserve_requests_in_flight", "Requests being served.", registry=self.registry)
        self.ttft = Histogram(
            "splitserve_ttft_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS_S, registry=self.registry
        )
        self.tpot = Histogram(
            "splitserve_tpot_seconds",
            "Time per output token after the first.",
            buckets=_TPOT_BUCKETS_S,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "splitserve_e2e_seconds", "Arrival to last token.", buckets=_LATENCY_BUCKETS_S, registry=self.registry
        )
        self.completion_tokens = Counter(
            "splitserve_completion_tokens", "Tokens streamed to clients.", registry=self.registry
        )
        self.rates = RateWindow()

    def record(self, api: str, status: str, summary: TimingSummary, completion_tokens: int) -> None:
        self.requests.labels(api=api, status=status).inc()
        self.completion_tokens.inc(completion_tokens)
        self.rates.record(completion_tokens)
        if summary.ttft_ms is not None:
            self.ttft.observe(summary.ttft_ms / 1000)
        if summary.tpot_ms is not None:
            self.tpot.observe(summary.tpot_ms / 1000)
        if status == "ok":
            self.e2e.observe(summary.e2e_ms / 1000)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RateWindow:
    """Finished requests and streamed tokens per second over the last ``window_s``: what ``splitserve status`` shows
    (Prometheus has the full counters; a person at a terminal wants the current rate without a query)."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._since = clock()
        self._events: deque[tuple[float, int]] = deque()

    def record(self, tokens: int) -> None:
        self._events.append((self._clock(), tokens))

    def rates(self) -> tuple[float, float]:
        """(requests/s, tokens/s); over the time since start while that is shorter than the window."""
        now = self._clock()
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        span = max(min(self.window_s, now - self._since), 1e-9)
        return len(self._events) / span, sum(t for _, t in self._events) / span
