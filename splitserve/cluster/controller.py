"""The cluster: the prefill and decode pools as Ray actors, kept alive, with requests routed through them.

A facade over three parts, each with one job: ``pools`` (lifecycle and scaling), ``health`` (health checks,
restarts, Ray liveness, and why nothing can be served) and ``request_path`` (attempts, retries, the token stream).
The server and the tests use this class only.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Callable
from typing import Any

import ray

from splitserve.cluster.health import Health
from splitserve.cluster.messages import ErrorCode, GenerateRequest, RequestTiming, ServingError, TokenBatch, WorkerStats
from splitserve.cluster.pools import SCALE_DRAIN_TIMEOUT_S, Pools, ScaleResult, WorkerHandle
from splitserve.cluster.ray_init import ray_init_args
from splitserve.cluster.request_path import RequestPath
from splitserve.cluster.router import Move, Router
from splitserve.config import SplitserveConfig
from splitserve.engine.resolve import resolve_model_path

log = logging.getLogger(__name__)


class Cluster:
    def __init__(self, config: SplitserveConfig, on_ray_gone: Callable[[str], None] | None = None):
        """``on_ray_gone(reason)`` is called once, from a watch thread, when the Ray cluster under this one is gone
        (see splitserve.cluster.ray_watch); by then every request is already refused UNAVAILABLE."""
        self.config = config
        self.model_dir = str(resolve_model_path(config.model.path))
        self.router = Router.from_config(config.router)
        self.tokenizer: Any = None
        self.pools = Pools(config, self.model_dir, self.router)
        self.health = Health(self.pools, on_ray_gone)
        self.requests = RequestPath(self.pools, self.health)
        self._inflight = self.requests.inflight  # the same dict: what is running, for status and the chaos checks

    @property
    def workers(self) -> dict[str, WorkerHandle]:
        return self.pools.workers

    @property
    def draining(self) -> bool:
        return self.pools.draining

    async def start(self) -> None:
        if not ray.is_initialized():
            ray.init(**ray_init_args(self.config.cluster, os.environ))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        await self.pools.start()
        self.health.start()

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking requests, let in-flight ones finish (bounded), then stop every actor."""
        self.pools.draining = True
        tasks = [t for t in self._inflight.values() if t is not None]
        if tasks and drain_timeout_s > 0:
            await asyncio.wait(tasks, timeout=drain_timeout_s)
        self.health.stop()
        left = len([t for t in tasks if not t.done()])
        self.pools.stop_all()
        log.info("every worker stopped (%d requests were still in flight)", left)

    def abandon(self) -> None:
        """The Ray cluster is gone: refuse requests and stop the loops, without a Ray call (the actors went with it)."""
        self.pools.draining = True
        self.health.stop()
        for worker in self.workers.values():
            if worker.channel is not None:
                worker.channel.close()

    async def scale(self, role: str, replicas: int, drain_timeout_s: float = SCALE_DRAIN_TIMEOUT_S) -> ScaleResult:
        return await self.pools.scale(role, replicas, drain_timeout_s)

    async def rebalance(self) -> tuple[Move | None, list[ScaleResult]]:
        return await self.pools.rebalance()

    def generate(
        self, request: GenerateRequest, timing: RequestTiming | None = None
    ) -> AsyncGenerator[TokenBatch, None]:
        """Stream a request's tokens. Raises ServingError with a code the APIs map to a status."""
        return self.requests.generate(request, timing)

    async def cancel(self, request_id: str) -> bool:
        return await self.requests.cancel(request_id)

    def unavailable_reason(self) -> str | None:
        return self.health.unavailable_reason()

    @property
    def max_model_len(self) -> int:
        """The longest prompt + output any request may have (the smallest over the workers)."""
        return self._least_over_workers("max_model_len")

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the model's embedding rows, which may outnumber the tokenizer's ids (padded
        vocabularies), so the model can answer with ids the tokenizer lacks and a follow-up resends them."""
        return self._least_over_workers("vocab_size")

    def _least_over_workers(self, key: str) -> int:
        """UNAVAILABLE while no worker is registered: there is nothing to take the figure from."""
        figures = [w.info[key] for w in self.workers.values() if w.info]
        if not figures:
            raise ServingError(ErrorCode.UNAVAILABLE, self.unavailable_reason() or "no worker is registered")
        return min(figures)

    async def status(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode.value,
            "model": self.config.model.served_name,
            "inflight": len(self._inflight),
            "draining": self.draining,
            "unavailable": self.unavailable_reason(),
            "workers": self.worker_status(),
            "router": self.router.loads(),
        }

    def worker_status(self) -> list[dict[str, Any]]:
        """Each worker's state and the stats the health loop last polled (at most HEALTH_INTERVAL_S old). Not async,
        so a Prometheus collector can read it at scrape time."""
        return self.pools.worker_status()

    async def refresh_stats(self) -> list[WorkerStats]:
        return await self.health.refresh_stats()
