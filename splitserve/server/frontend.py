"""What both APIs share: validation context, the per-client limit, metrics, and one request's trip to the cluster."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from splitserve.cluster.messages import GenerateRequest, RequestTiming, ServingError, TokenBatch
from splitserve.config import ServerConfig, SplitserveConfig
from splitserve.ops.logs import request_id_var
from splitserve.server.cluster_metrics import ClusterCollector
from splitserve.server.limits import ClientLimiter
from splitserve.server.metrics import ServerMetrics
from splitserve.server.timing import TimingSummary
from splitserve.server.validation import ValidationContext

if TYPE_CHECKING:
    from splitserve.cluster.pools import ScaleResult
    from splitserve.cluster.router import Move

log = logging.getLogger(__name__)


class ServingCluster(Protocol):
    """The part of splitserve.cluster.controller.Cluster the APIs use."""

    config: SplitserveConfig
    tokenizer: Any

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def unavailable_reason(self) -> str | None: ...

    def generate(
        self, request: GenerateRequest, timing: RequestTiming | None = None
    ) -> AsyncGenerator[TokenBatch, None]: ...

    async def cancel(self, request_id: str) -> bool: ...

    async def status(self) -> dict[str, Any]: ...

    def worker_status(self) -> list[dict[str, Any]]: ...

    async def scale(self, role: str, replicas: int) -> ScaleResult: ...

    async def rebalance(self) -> tuple[Move | None, list[ScaleResult]]: ...


@dataclass
class Run:
    """One request on its way through the cluster, with what its last response reports."""

    request: GenerateRequest
    timing: RequestTiming = field(default_factory=lambda: RequestTiming(arrival=time.monotonic()))
    completion_tokens: int = 0

    @property
    def summary(self) -> TimingSummary:
        return TimingSummary.of(self.timing, self.completion_tokens)


class Frontend:
    def __init__(self, cluster: ServingCluster, server: ServerConfig):
        self.cluster = cluster
        self.server = server
        self.limiter = ClientLimiter(server.max_concurrent_per_client)
        self.metrics = ServerMetrics()
        self.metrics.registry.register(ClusterCollector(cluster.worker_status))

    @property
    def model_name(self) -> str:
        return self.cluster.config.model.served_name

    def validation_context(self) -> ValidationContext:
        return ValidationContext(
            tokenizer=self.cluster.tokenizer,
            max_model_len=self.cluster.max_model_len,
            vocab_size=self.cluster.vocab_size,
            served_name=self.model_name,
            max_request_bytes=self.server.max_request_bytes,
        )

    async def stream(self, run: Run, api: str, client: str) -> AsyncGenerator[TokenBatch, None]:
        """The cluster's batches for ``run``; closing or cancelling this iterator aborts the request in the cluster."""
        # Each API call runs in its own task (grpc.aio and aiohttp both), so the id stays with this request's logs.
        request_id_var.set(run.request.request_id)
        with self.limiter.slot(client):
            self.metrics.inflight.inc()
            status = "ok"
            try:
                # Closing the cluster's generator runs its cleanup (the abort) now, not at garbage collection.
                async with aclosing(self.cluster.generate(run.request, run.timing)) as batches:
                    async for batch in batches:
                        run.completion_tokens += len(batch.tokens)
                        yield batch
            except ServingError as err:
                status = err.code.value
                raise
            except (asyncio.CancelledError, GeneratorExit):
                status = "cancelled"
                raise
            except Exception:
                status = "internal"
                raise
            finally:
                self.metrics.inflight.dec()
                summary = run.summary
                self.metrics.record(api, status, summary, run.completion_tokens)
                log.info(
                    "request %s (%s) %s: %d tokens in %.0f ms",
                    run.request.request_id,
                    api,
                    status,
                    run.completion_tokens,
                    summary.e2e_ms,
                )
