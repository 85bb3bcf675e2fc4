"""The cluster: starts the prefill and decode pools as Ray actors, routes requests through them, keeps them alive.

A request's life (disaggregated): the router books a prefill worker P and a decode worker D; D reserves pages for
the prompt's KV; P computes the prompt, streams the KV into those pages layer by layer and returns the first
token; D admits the request and streams the rest. Any failure or cancel on the way is sent to both P and D as an
explicit abort, so each frees its pages at once. A worker that dies is detected by the failed call itself (Ray
raises at once) and by the health loop, restarted, and the request is re-run on other workers with the tokens
already streamed appended to its prompt, so the client sees no duplicate and no gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from splitserve.cluster.messages import (
    ErrorCode,
    GenerateRequest,
    RequestTiming,
    ServingError,
    TokenBatch,
    WorkerStats,
)
from splitserve.cluster.router import Router
from splitserve.cluster.worker_options import WorkerOptions, options_for
from splitserve.config import Device, ServingMode, SplitserveConfig, _PoolConfig
from splitserve.engine.resolve import resolve_model_path

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 10.0
ABORT_TIMEOUT_S = 5.0
WorkerGone = (RayActorError, asyncio.TimeoutError)


def _cause(err: BaseException) -> BaseException:
    """The worker-side exception behind a Ray task error."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        return err.cause
    return err


@dataclass
class _Worker:
    worker_id: str
    role: str  # "prefill" | "decode"
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    stats: WorkerStats | None = None
    healthy: bool = True
    restarts: int = 0


class Cluster:
    def __init__(self, config: SplitserveConfig):
        self.config = config
        self.model_dir = str(resolve_model_path(config.model.path))
        self.router = Router(config.router.policy)
        self.workers: dict[str, _Worker] = {}
        self._inflight: dict[str, asyncio.Task | None] = {}
        self._health_task: asyncio.Task | None = None
        self._draining = False
        self.tokenizer: Any = None

    # --- lifecycle ---

    def _actor_options(self, pool) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "num_cpus": 0,
            "max_restarts": 0,
            "max_concurrency": 4096,
            "namespace": self.config.cluster.namespace,
        }
        if self.config.cluster.device != Device.cpu:
            opts["num_gpus"] = pool.gpus_per_replica
            if pool.gpu_type:
                opts["accelerator_type"] = pool.gpu_type
        return opts

    def _pools(self) -> list[tuple[str, _PoolConfig, WorkerOptions]]:
        cfg = self.config
        pools: list[tuple[str, _PoolConfig, WorkerOptions]] = [
            ("decode", cfg.decode, options_for(cfg, cfg.decode, self.model_dir))
        ]
        if cfg.mode == ServingMode.disaggregated:
            pools.insert(0, ("prefill", cfg.prefill, options_for(cfg, cfg.prefill, self.model_dir)))
        return pools

    def _spawn(self, role: str, worker_id: str, pool, options: WorkerOptions) -> _Worker:
        from splitserve.decode_worker.worker import DecodeWorker
        from splitserve.prefill_worker.worker import PrefillWorker

        cls = PrefillWorker if role == "prefill" else DecodeWorker
        actor = ray.remote(cls).options(**self._actor_options(pool)).remote(worker_id, options)
        return _Worker(worker_id, role, actor)

    async def start(self) -> None:
        if not ray.is_initialized():
            ray.init(
                address=self.config.cluster.address,
                namespace=self.config.cluster.namespace,
                include_dashboard=False,
                log_to_driver=True,
            )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        pending = []
        for role, pool, options in self._pools():
            for i in range(pool.replicas):
                worker = self._spawn(role, f"{role}-{i}", pool, options)
                self.workers[worker.worker_id] = worker
                pending.append(worker)
        for worker in pending:
            await self._register(worker)
            log.info(
                "%s ready on %s (%d KV blocks)",
                worker.worker_id,
                worker.info.get("device"),
                worker.info.get("kv_blocks", 0),
            )
        self._health_task = asyncio.create_task(self._health_loop())

    @property
    def max_model_len(self) -> int:
        """The longest prompt + output any request may have (the smallest over the workers)."""
        return min(w.info["max_model_len"] for w in self.workers.values() if w.info)

    async def _register(self, worker: _Worker) -> None:
        worker.info = await worker.actor.ready.remote()
        pool = self.config.prefill if worker.role == "prefill" else self.config.decode
        if worker.role == "prefill":
            self.router.add_prefill_worker(worker.worker_id, pool.max_queue)
        else:
            capacity = worker.info["kv_blocks"] * worker.info["block_size"]
            self.router.add_decode_worker(worker.worker_id, capacity, pool.max_queue)

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking requests, let in-flight ones finish (bounded), then stop every actor."""
        self._draining = True
        tasks = [t for t in self._inflight.values() if t is not None]
        if tasks and drain_timeout_s > 0:
            await asyncio.wait(tasks, timeout=drain_timeout_s)
        if self._health_task:
            self._health_task.cancel()
        for worker in self.workers.values():
            ray.kill(worker.actor, no_restart=True)
        self.workers.clear()

    # --- health ---

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await asyncio.gather(*(self._check(w) for w in list(self.workers.values())))

    async def _check(self, worker: _Worker) -> None:
        try:
            worker.stats = await asyncio.wait_for(worker.actor.stats.remote(), HEALTH_TIMEOUT_S)
            ok = worker.stats is not None and worker.stats.extra.get("engine_failed", 0.0) == 0.0
        except WorkerGone:
            ok = False
        except Exception:
            log.exception("health check of %s", worker.worker_id)
            ok = False
        if not ok and worker.healthy:
            log.warning("%s is unhealthy; restarting it", worker.worker_id)
        worker.healthy = ok
        self.router.set_healthy(worker.worker_id, ok)
        if not ok:
            await self._restart(worker)

    async def _restart(self, worker: _Worker) -> None:
        self.router.remove_worker(worker.worker_id)
        ray.kill(worker.actor, no_restart=True)
        role = worker.role
        pool, options = next((p, o) for r, p, o in self._pools() if r == role)
        fresh = self._spawn(role, worker.worker_id, pool, options)
        fresh.restarts = worker.restarts + 1
        self.workers[worker.worker_id] = fresh
        await self._register(fresh)
        log.info("%s restarted (restart %d)", fresh.worker_id, fresh.restarts)

    # --- requests ---

    def validate(self, request: GenerateRequest) -> None:
        if self._draining:
            raise ServingError(ErrorCode.UNAVAILABLE, "the cluster is shutting down; retry on another replica")
        if request.request_id in self._inflight:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"request_id: {request.request_id!r} is already running")
        if len(self._inflight) >= self.config.router.max_queue:
            raise ServingError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{len(self._inflight)} requests in flight, the limit is router.max_queue; retry later",
            )

    async def generate(
        self, request: GenerateRequest, timing: RequestTiming | None = None
    ) -> AsyncGenerator[TokenBatch, None]:
        """Stream a request's tokens. Raises ServingError with a code the APIs map to a status."""
        self.validate(request)
        timing = timing or RequestTiming(arrival=time.monotonic())
        self._inflight[request.request_id] = asyncio.current_task()
        produced: list[int] = []
        excluded: set[str] = set()
        try:
            while True:
                attempt = GenerateRequest(request.request_id, request.prompt_token_ids, request.params, tuple(produced))
                try:
                    async for batch in self._attempt(attempt, timing, frozenset(excluded)):
                        produced.extend(t.token_id for t in batch.tokens)
                        if timing.first_token is None and batch.tokens:
                            timing.first_token = time.monotonic()
                        if batch.finished:
                            timing.finished = time.monotonic()
                        yield batch
                    return
                except _WorkerDied as died:
                    excluded.add(died.worker_id)
                    timing.retries += 1
                    if timing.retries > self.config.router.max_retries:
                        raise ServingError(
                            ErrorCode.UNAVAILABLE, f"worker {died.worker_id} died and retries are exhausted"
                        ) from None
                    log.warning("%s: worker %s died; retry %d", request.request_id, died.worker_id, timing.retries)
        finally:
            self._inflight.pop(request.request_id, None)

    async def cancel(self, request_id: str) -> bool:
        task = self._inflight.get(request_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def _attempt(
        self, request: GenerateRequest, timing: RequestTiming, exclude: frozenset[str]
    ) -> AsyncIterator[TokenBatch]:
        params = request.engine_params
        prompt_len = len(request.engine_prompt)
        placement = self.router.place(prompt_len, params.max_tokens, exclude)
        decode = self.workers[placement.decode_worker]
        prefill = self.workers[placement.prefill_worker] if placement.prefill_worker else None
        timing.decode_worker = decode.worker_id
        timing.prefill_worker = (prefill or decode).worker_id
        prefill_booked = prefill is not None
        finished = False
        try:
            if prefill is None:
                flow = self._stream(
                    decode.actor.generate_local.options(num_returns="streaming").remote(request), decode
                )
            else:
                flow = self._split_flow(request, timing, prefill, decode)
            async for batch in flow:
                if prefill_booked:  # the first token means the prompt left the prefill queue
                    self.router.prefill_done(prefill.worker_id, prompt_len)  # type: ignore[union-attr]
                    prefill_booked = False
                finished = batch.finished
                yield batch
        except ServingError as err:
            if err.code == ErrorCode.UNAVAILABLE:
                # A failed transfer usually means a peer died: then retry elsewhere.
                for worker in (prefill, decode):
                    if worker is not None and not await self._alive(worker):
                        raise _WorkerDied(worker.worker_id) from None
            raise
        finally:
            if prefill_booked and prefill is not None:
                self.router.prefill_done(prefill.worker_id, prompt_len)
            self.router.decode_done(decode.worker_id, prompt_len + params.max_tokens)
            if not finished:
                await self._abort_everywhere(request.request_id, [w for w in (prefill, decode) if w is not None])

    async def _split_flow(
        self, request: GenerateRequest, timing: RequestTiming, prefill: _Worker, decode: _Worker
    ) -> AsyncIterator[TokenBatch]:
        """D reserves pages, P computes the prompt and streams its KV into them, D decodes the rest."""
        reservation = await self._call(decode, decode.actor.reserve.remote(request))
        prefill_stream = prefill.actor.prefill.options(num_returns="streaming").remote(
            request, decode.info["endpoint"], reservation
        )
        first = await self._next(prefill_stream, prefill)
        yield first
        if first.finished:
            return
        transfer = asyncio.ensure_future(self._next(prefill_stream, prefill))
        try:
            stream = decode.actor.generate.options(num_returns="streaming").remote(request.request_id, first.tokens[0])
            async for batch in self._stream(stream, decode):
                if timing.kv_transfer_s is None:
                    # D decodes only once every layer has landed, so the report is (nearly) in by now.
                    report = await transfer
                    timing.kv_transfer_s = report.seconds
                yield batch
        finally:
            transfer.cancel()

    async def _alive(self, worker: _Worker) -> bool:
        try:
            await asyncio.wait_for(worker.actor.ready.remote(), HEALTH_TIMEOUT_S)
            return True
        except WorkerGone:
            return False

    async def _abort_everywhere(self, request_id: str, workers: list[_Worker]) -> None:
        """Tell every holder of the request's state to free it now; shielded so a cancel cannot skip it."""
        calls = [asyncio.wait_for(w.actor.abort.remote(request_id), ABORT_TIMEOUT_S) for w in workers]
        await asyncio.shield(asyncio.gather(*calls, return_exceptions=True))

    async def _call(self, worker: _Worker, ref):
        try:
            return await ref
        except RayActorError:
            raise _WorkerDied(worker.worker_id) from None
        except RayTaskError as err:
            raise _cause(err) from None

    async def _next(self, stream, worker: _Worker) -> Any:
        try:
            ref = await stream.__anext__()
        except StopAsyncIteration:
            raise ServingError(ErrorCode.INTERNAL, f"{worker.worker_id} ended the stream early") from None
        except RayActorError:
            raise _WorkerDied(worker.worker_id) from None
        return await self._call(worker, ref)

    async def _stream(self, stream, worker: _Worker) -> AsyncIterator[TokenBatch]:
        while True:
            try:
                ref = await stream.__anext__()
            except StopAsyncIteration:
                return
            except RayActorError:
                raise _WorkerDied(worker.worker_id) from None
            batch = await self._call(worker, ref)
            yield batch
            if batch.finished:
                return

    # --- status ---

    async def status(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode.value,
            "model": self.config.model.served_name,
            "inflight": len(self._inflight),
            "draining": self._draining,
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "role": w.role,
                    "healthy": w.healthy,
                    "restarts": w.restarts,
                    "device": w.info.get("device"),
                    **(w.stats.__dict__ if w.stats else {}),
                }
                for w in self.workers.values()
            ],
            "router": self.router.loads(),
        }

    async def refresh_stats(self) -> list[WorkerStats]:
        await asyncio.gather(*(self._check(w) for w in list(self.workers.values())))
        return [w.stats for w in self.workers.values() if w.stats]


class _WorkerDied(Exception):
    def __init__(self, worker_id: str):
        super().__init__(worker_id)
        self.worker_id = worker_id
