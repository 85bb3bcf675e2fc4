"""The cluster: starts the prefill and decode pools as Ray actors, routes requests through them, keeps them alive.

A request's life (disaggregated): the router books a prefill worker P and a decode worker D; D reserves pages for
the prompt's KV; P computes the prompt, streams the KV into those pages layer by layer and returns the first
token; D admits the request and streams the rest. Any failure or cancel on the way is sent to both P and D as an
explicit abort, so each frees its pages at once. A worker that dies is detected by the failed call itself (Ray
raises at once) and by the health loop, restarted, and the request is re-run on other workers with the tokens
already streamed appended to its prompt, so the client sees no duplicate and no gap.

Pools can be resized while serving (``scale``): new workers join the router once ready; removed ones are drained
first (no new requests, running ones finish), so no request is dropped.

With no worker able to serve (all down, restarts failing) or the Ray cluster gone, ``unavailable_reason`` says why,
and every request is refused UNAVAILABLE with that reason instead of failing inside.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError, RayTaskError

from splitserve import handoff_trace
from splitserve.cluster.messages import (
    ErrorCode,
    GenerateRequest,
    PendingPages,
    RequestTiming,
    ServingError,
    TokenBatch,
    WorkerStats,
)
from splitserve.cluster.ray_init import ray_init_args
from splitserve.cluster.ray_watch import RayWatch
from splitserve.cluster.router import Move, Router
from splitserve.cluster.token_channel import TokenChannel, WorkerDied
from splitserve.cluster.worker_options import options_for
from splitserve.config import Device, RouterPolicy, ServingMode, SplitserveConfig, _PoolConfig
from splitserve.engine.resolve import resolve_model_path
from splitserve.roles import Role
from splitserve.worker_common import CONCURRENCY_GROUPS

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 10.0
ABORT_TIMEOUT_S = 5.0
# A worker Ray cannot place (no free GPU of its type) fails startup or `scale` after this long.
READY_TIMEOUT_S = 600.0
SCALE_DRAIN_TIMEOUT_S = 120.0
RETIRE_POLL_S = 0.1
WorkerGone = (RayActorError, asyncio.TimeoutError)
T = TypeVar("T")


def _cause(err: BaseException) -> BaseException:
    """The worker-side exception behind a Ray task error."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        return err.cause
    return err


def _last_line(err: BaseException) -> str:
    """The line that names the cause: Ray's error text is the worker's whole traceback, ending with it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


async def _traced(awaitable: Awaitable[T], event: str, request_id: str) -> T:
    result = await awaitable
    handoff_trace.mark(event, request_id)
    return result


@dataclass
class ScaleResult:
    role: Role
    before: int
    after: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        changes = [f"started {', '.join(self.added)}"] if self.added else []
        if self.removed:
            changes.append(f"drained and stopped {', '.join(self.removed)}")
        return f"{self.role}: {self.before} → {self.after} replicas ({'; '.join(changes) or 'no change'})"


@dataclass
class _Worker:
    role: Role
    index: int  # the worker id's number within its pool: ids are never reused, so a restart keeps it
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    stats: WorkerStats | None = None
    healthy: bool = True
    problem: str | None = None  # why it cannot serve, while it cannot
    restarts: int = 0
    channel: TokenChannel | None = None  # decode workers: their tokens, once ready

    @property
    def worker_id(self) -> str:
        return f"{self.role}-{self.index}"

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        ray.kill(self.actor, no_restart=True)


class Cluster:
    def __init__(self, config: SplitserveConfig, on_ray_gone: Callable[[str], None] | None = None):
        """``on_ray_gone(reason)`` is called once, from a watch thread, when the Ray cluster under this one is gone
        (see splitserve.cluster.ray_watch); by then every request is already refused UNAVAILABLE."""
        self.config = config
        self.model_dir = str(resolve_model_path(config.model.path))
        self.router = Router(config.router.policy)
        self.workers: dict[str, _Worker] = {}
        self._inflight: dict[str, asyncio.Task | None] = {}
        self._health_task: asyncio.Task | None = None
        self._draining = False
        self.tokenizer: Any = None
        self._using: Counter[str] = Counter()  # attempts in flight per worker: what a retiring worker waits for
        self._spawned: Counter[Role] = Counter()  # per role, so a worker id is never reused by a scale-up
        self._restarting: set[str] = set()
        self._retiring: set[str] = set()
        self._scale_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._on_ray_gone = on_ray_gone
        self._ray_watch: RayWatch | None = None
        self.ray_gone: str | None = None  # why the Ray cluster is gone, once it is

    # --- lifecycle ---

    def _actor_options(self, pool: _PoolConfig) -> dict[str, Any]:
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

    def _roles(self) -> list[Role]:
        """The pools this cluster runs; hybrid workers are decode workers that also take prompt overflow."""
        split = [Role.PREFILL] if self.config.mode == ServingMode.disaggregated else []
        return [*split, Role.DECODE, Role.HYBRID]

    def _pool(self, role: Role) -> _PoolConfig:
        pools: dict[Role, _PoolConfig] = {
            Role.PREFILL: self.config.prefill,
            Role.DECODE: self.config.decode,
            Role.HYBRID: self.config.hybrid,
        }
        return pools[role]

    def _spawn(self, role: Role, index: int) -> _Worker:
        from splitserve.decode_worker.worker import DecodeWorker
        from splitserve.prefill_worker.worker import PrefillWorker

        pool = self._pool(role)
        cls = PrefillWorker if role == Role.PREFILL else DecodeWorker
        options = options_for(self.config, pool, self.model_dir)
        actor_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(cls)  # type: ignore[call-overload]  # stubs lack it
        worker = _Worker(role, index, actor=None)
        worker.actor = actor_cls.options(**self._actor_options(pool)).remote(worker.worker_id, options)
        self.workers[worker.worker_id] = worker
        return worker

    async def start(self) -> None:
        if not ray.is_initialized():
            ray.init(**ray_init_args(self.config.cluster, os.environ))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        roles = [role for role in self._roles() for _ in range(self._pool(role).replicas)]
        workers = [self._spawn(role, self._next_index(role)) for role in roles]
        await self._bring_up(workers)
        self._health_task = asyncio.create_task(self._health_loop())
        self._ray_watch = RayWatch(self._lost_ray)
        self._ray_watch.start()

    def _lost_ray(self, reason: str) -> None:
        """From the watch thread: refuse every request from now on, then tell the owner."""
        self.ray_gone = reason
        log.error("the Ray cluster is gone: %s", reason)
        if self._on_ray_gone is not None:
            self._on_ray_gone(reason)

    def _next_index(self, role: Role) -> int:
        index = self._spawned[role]
        self._spawned[role] += 1
        return index

    async def _bring_up(self, workers: list[_Worker]) -> None:
        """Register each worker as soon as it is ready (one log line each); if any fails, stop them all."""
        started = time.monotonic()
        total = Counter(w.role for w in workers)
        ready: Counter[Role] = Counter()

        async def one(worker: _Worker) -> None:
            await self._register(worker)
            ready[worker.role] += 1
            log.info(
                "%s ready (%d/%d %s) on %s in %.1f s (%d KV blocks)",
                worker.worker_id,
                ready[worker.role],
                total[worker.role],
                worker.role,
                worker.info.get("device"),
                time.monotonic() - started,
                worker.info.get("kv_blocks", 0),
            )

        results = await asyncio.gather(*(one(w) for w in workers), return_exceptions=True)
        failures = [err for err in results if isinstance(err, BaseException)]
        if failures:
            for worker in workers:
                self._forget(worker)
                worker.stop()
            raise failures[0]

    @property
    def max_model_len(self) -> int:
        """The longest prompt + output any request may have (the smallest over the workers). UNAVAILABLE while no
        worker is registered: there is nothing to take the figure from."""
        lengths = [w.info["max_model_len"] for w in self.workers.values() if w.info]
        if not lengths:
            raise ServingError(ErrorCode.UNAVAILABLE, self.unavailable_reason() or "no worker is registered")
        return min(lengths)

    def unavailable_reason(self) -> str | None:
        """Why no request can be served now, or None when one can: a decode-capable worker (decode or hybrid pool)
        and, split, a prefill-capable one (prefill or hybrid pool, or a decode worker under ``borrow_idle``)
        must be registered, healthy, and neither restarting nor retiring."""
        if self.ray_gone is not None:
            return f"the Ray cluster is gone ({self.ray_gone}); the server exits for its supervisor to restart it"
        if self._draining:
            return "the cluster is shutting down; retry on another replica"
        serving = {w.role for w in self._ready_workers() if w.healthy}
        needed = [("decode", {Role.DECODE, Role.HYBRID})]
        if self.config.mode == ServingMode.disaggregated and self.config.router.policy != RouterPolicy.borrow_idle:
            needed.append(("prefill", {Role.PREFILL, Role.HYBRID}))
        for phase, roles in needed:
            if not serving & roles:
                states = "; ".join(
                    f"{w.worker_id}: {self._why_down(w)}" for w in self.workers.values() if w.role in roles
                )
                return f"no worker can run the {phase} phase ({states or 'none is running'}); retry later"
        return None

    def _why_down(self, worker: _Worker) -> str:
        if worker.problem is not None:
            return worker.problem
        if worker.worker_id in self._restarting:
            return "restarting"
        if worker.worker_id in self._retiring:
            return "retiring"
        return "starting" if not worker.info else "failing its health checks"

    async def _register(self, worker: _Worker) -> _Worker:
        pool = self._pool(worker.role)
        try:
            worker.info = await asyncio.wait_for(worker.actor.ready.remote(), READY_TIMEOUT_S)
        except TimeoutError:
            raise ServingError(
                ErrorCode.UNAVAILABLE,
                f"{worker.worker_id} was not placed in {READY_TIMEOUT_S:.0f} s: no free GPU fits "
                f"{worker.role}.gpus_per_replica={pool.gpus_per_replica} gpu_type={pool.gpu_type!r} "
                "(see `ray status`; lower them or add nodes)",
            ) from None
        except RayActorError as err:
            failure = f"{worker.worker_id} failed to start: {_last_line(err)}"
            raise ServingError(ErrorCode.UNAVAILABLE, failure) from None
        if worker.role == Role.PREFILL:
            self.router.add_prefill_worker(worker.worker_id, pool.max_queue)
        else:
            worker.channel = TokenChannel(worker.worker_id, worker.actor, on_broken=lambda: self._replace(worker))
            capacity = worker.info["kv_blocks"] * worker.info["block_size"]
            self.router.add_decode_worker(worker.worker_id, capacity, pool.max_queue, hybrid=worker.role == Role.HYBRID)
        return worker

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking requests, let in-flight ones finish (bounded), then stop every actor."""
        self._draining = True
        if self._ray_watch is not None:
            self._ray_watch.stop()
        tasks = [t for t in self._inflight.values() if t is not None]
        if tasks and drain_timeout_s > 0:
            await asyncio.wait(tasks, timeout=drain_timeout_s)
        if self._health_task:
            self._health_task.cancel()
        left = len([t for t in tasks if not t.done()])
        for worker in self.workers.values():
            worker.stop()
        log.info("every worker stopped (%d requests were still in flight)", left)
        self.workers.clear()

    def abandon(self) -> None:
        """The Ray cluster is gone: refuse requests and stop the loops, without a Ray call (the actors went with it)."""
        self._draining = True
        if self._ray_watch is not None:
            self._ray_watch.stop()
        if self._health_task:
            self._health_task.cancel()
        for worker in self.workers.values():
            if worker.channel is not None:
                worker.channel.close()

    # --- scaling ---

    async def scale(self, role: str, replicas: int, drain_timeout_s: float = SCALE_DRAIN_TIMEOUT_S) -> ScaleResult:
        """Grow or shrink one pool while serving. Removed workers are the least busy; they drain before they stop."""
        pools = [r.value for r in self._roles()]
        if role not in pools:
            raise ServingError(
                ErrorCode.INVALID_ARGUMENT,
                f"role: {role!r} is not a pool of this {self.config.mode.value} cluster; use one of {pools}",
            )
        return await self._scale(Role(role), replicas, drain_timeout_s)

    async def _scale(self, role: Role, replicas: int, drain_timeout_s: float) -> ScaleResult:
        least = 0 if role == Role.HYBRID else 1  # the hybrid pool is optional; the others carry every request
        if replicas < least:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"replicas: the {role} pool needs at least {least}")
        if self._draining:
            raise ServingError(ErrorCode.UNAVAILABLE, "the cluster is shutting down")
        async with self._scale_lock:
            members = [w for w in self.workers.values() if w.role == role and w.worker_id not in self._retiring]
            result = ScaleResult(role, before=len(members), after=replicas)
            if replicas > len(members):
                fresh = [self._spawn(role, self._next_index(role)) for _ in range(replicas - len(members))]
                await self._bring_up(fresh)
                result.added = [w.worker_id for w in fresh]
            elif replicas < len(members):
                loads = self.router.loads()
                # Least busy first; on a tie, the newest goes.
                members.sort(key=lambda w: (loads.get(w.worker_id, {}).get("requests", 0.0), -w.index))
                victims = members[: len(members) - replicas]
                result.removed = [w.worker_id for w in victims]
                await asyncio.gather(*(self._retire(w, drain_timeout_s) for w in victims))
            log.info("scaled %s", result)
            return result

    async def rebalance(self) -> tuple[Move | None, list[ScaleResult]]:
        """Move one worker to the phase under sustained pressure (see Router.rebalance_move): start one there, then
        drain one from the other pool."""
        move = self.router.rebalance_move()
        if move is None:
            return None, []

        def active(role: Role) -> int:
            return sum(w.role == role and w.worker_id not in self._retiring for w in self.workers.values())

        grown = await self._scale(move.target, active(move.target) + 1, SCALE_DRAIN_TIMEOUT_S)
        shrunk = await self._scale(move.source, active(move.source) - 1, SCALE_DRAIN_TIMEOUT_S)
        self.router.balance.gaps.clear()  # the next move needs a fresh window of evidence
        return move, [grown, shrunk]

    async def _retire(self, worker: _Worker, drain_timeout_s: float) -> None:
        """Drain, then stop: requests still running at the deadline fail over to other workers (retried, no gap)."""
        self._retiring.add(worker.worker_id)
        self.router.set_draining(worker.worker_id)
        try:
            deadline = time.monotonic() + drain_timeout_s
            while self._using[worker.worker_id] > 0 and time.monotonic() < deadline:
                await asyncio.sleep(RETIRE_POLL_S)
            if self._using[worker.worker_id] > 0:
                log.warning(
                    "%s: %d requests still running after %.0f s of draining; they are retried elsewhere",
                    worker.worker_id,
                    self._using[worker.worker_id],
                    drain_timeout_s,
                )
            self._forget(worker)
            worker.stop()
        finally:
            self._retiring.discard(worker.worker_id)

    def _forget(self, worker: _Worker) -> None:
        if self.workers.get(worker.worker_id) is worker:
            del self.workers[worker.worker_id]
            self.router.remove_worker(worker.worker_id)

    # --- health ---

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await asyncio.gather(*(self._check(w) for w in self._ready_workers()))
            self.router.sample_balance()

    def _ready_workers(self) -> list[_Worker]:
        busy = self._restarting | self._retiring
        return [w for w in self.workers.values() if w.info and w.worker_id not in busy]

    async def _check(self, worker: _Worker) -> None:
        dead = False
        try:
            stats: WorkerStats = await asyncio.wait_for(worker.actor.stats.remote(), HEALTH_TIMEOUT_S)
            worker.stats = stats
            ok = stats.extra.get("engine_failed", 0.0) == 0.0
            dead = not ok  # an engine whose step raised does not recover: replace the worker
        except RayActorError:
            ok, dead = False, True
        except TimeoutError:
            ok = False  # stalled (paused, swamped): route around it until it answers again; a stall is no death
        except Exception:
            log.exception("health check of %s", worker.worker_id)
            ok = False
        if ok != worker.healthy:
            log.warning("%s is %s", worker.worker_id, "healthy again" if ok else "unhealthy")
        worker.healthy = ok
        self.router.set_healthy(worker.worker_id, ok)
        if dead:
            await self._restart(worker)

    def _replace(self, worker: _Worker) -> None:
        """A decode worker's token channel broke while the worker was listed: it cannot stream, so replace it."""
        self._background.add(task := asyncio.create_task(self._restart(worker)))
        task.add_done_callback(self._background.discard)

    async def _restart(self, worker: _Worker) -> None:
        busy = self._restarting | self._retiring
        if self._draining or worker.worker_id in busy or self.workers.get(worker.worker_id) is not worker:
            return  # stopping, already being replaced (by the health loop or a concurrent check), or retired
        self._restarting.add(worker.worker_id)
        try:
            self.router.remove_worker(worker.worker_id)
            worker.stop()
            fresh = self._spawn(worker.role, worker.index)
            fresh.restarts = worker.restarts + 1
            try:
                await self._register(fresh)
            except Exception as err:  # it stays listed, unhealthy and unrouted, for the operator to see (status)
                fresh.healthy = False
                fresh.problem = f"its restart failed: {err}"
                log.exception("%s failed to restart", fresh.worker_id)
                return
            log.info("%s restarted (restart %d)", fresh.worker_id, fresh.restarts)
        finally:
            self._restarting.discard(worker.worker_id)

    # --- requests ---

    def validate(self, request: GenerateRequest) -> None:
        if (reason := self.unavailable_reason()) is not None:
            raise ServingError(ErrorCode.UNAVAILABLE, reason)
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
                attempt = GenerateRequest(
                    request.request_id, request.prompt_token_ids, request.params, tuple(produced), timing.retries
                )
                try:
                    # aclosing: a client that goes away runs the attempt's cleanup (the aborts) now, not at GC.
                    async with aclosing(self._attempt(attempt, timing, frozenset(excluded))) as batches:
                        async for batch in batches:
                            produced.extend(t.token_id for t in batch.tokens)
                            if timing.first_token is None and batch.tokens:
                                timing.first_token = time.monotonic()
                            if batch.finished:
                                timing.finished = time.monotonic()
                            yield batch
                    return
                except WorkerDied as died:
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
    ) -> AsyncGenerator[TokenBatch, None]:
        placement = self.router.place(len(request.engine_prompt), request.engine_params.max_tokens, exclude)
        decode = self.workers[placement.decode_worker]
        prefill = self.workers[placement.prefill_worker] if placement.prefill_worker else None
        timing.decode_worker = decode.worker_id
        timing.prefill_worker = (prefill or decode).worker_id
        finished = False
        using = [w.worker_id for w in (prefill, decode) if w is not None]
        self._using.update(using)
        try:
            if prefill is None:
                flow = self._tokens(decode, request, lambda: decode.actor.start_local.remote(request))
            else:
                flow = self._split_flow(request, timing, prefill, decode)
            async for batch in flow:
                placement.prefill_done()  # the first token means the prompt left the prefill queue
                finished = batch.finished
                yield batch
        except ServingError as err:
            if err.code == ErrorCode.UNAVAILABLE:
                # A failed transfer usually means a peer died: then retry elsewhere.
                for worker in (prefill, decode):
                    if worker is not None and not await self._alive(worker):
                        raise WorkerDied(worker.worker_id) from None
            raise
        finally:
            placement.release()  # the one place an attempt's booking comes back, however it ended
            try:
                if not finished:
                    await self._abort_everywhere(request, [w for w in (prefill, decode) if w is not None])
            finally:
                self._using.subtract(using)

    async def _split_flow(
        self, request: GenerateRequest, timing: RequestTiming, prefill: _Worker, decode: _Worker
    ) -> AsyncIterator[TokenBatch]:
        """D reserves pages while P computes the prompt and streams its KV into them; D decodes the rest.

        P gets D's reservation as a pending reference and starts at once, so the reservation's round trip is off the
        first token's path. The first token waits for the reservation, though: a request D cannot take fails with
        D's error before the client sees any token, as if it had been asked first."""
        handoff_trace.mark("router.reserve", request.request_id)
        reserve = decode.actor.reserve.remote(request)
        prefill_stream = prefill.actor.prefill.options(num_returns="streaming").remote(
            request, decode.info["endpoint"], PendingPages(reserve)
        )
        first = await self._first_token(request, prefill_stream, prefill, self._call(decode, reserve))
        if first.finished:  # done at its first token: D's reservation is not needed, free it now (before the yield:
            await self._abort_everywhere(request, [decode])  # a client that closes on this token ends us there)
            yield first
            return
        yield first
        transfer = asyncio.ensure_future(self._next(prefill_stream, prefill))
        try:

            def start() -> Any:
                return decode.actor.start.remote(request.request_id, request.attempt, first.tokens[0])

            async for batch in self._tokens(decode, request, start):
                if timing.kv_transfer_s is None:
                    handoff_trace.mark("router.second_token", request.request_id)
                    # D decodes only once every layer has landed, so the report is (nearly) in by now.
                    report = await transfer
                    timing.kv_transfer_s, timing.kv_exposed_s = report.seconds, report.exposed_seconds
                yield batch
        finally:
            transfer.cancel()

    async def _first_token(
        self, request: GenerateRequest, prefill_stream: Any, prefill: _Worker, reservation: Awaitable[Any]
    ) -> TokenBatch:
        """P's first token once D has reserved the pages; whichever fails first ends the wait, D's failure winning
        where both did (it is the cause: P's transfer ends for want of pages)."""
        reserved = asyncio.ensure_future(_traced(reservation, "router.reserved", request.request_id))
        first = asyncio.ensure_future(
            _traced(self._next(prefill_stream, prefill), "router.first_token", request.request_id)
        )
        try:
            await asyncio.wait((reserved, first), return_when=asyncio.FIRST_EXCEPTION)
            for task in (reserved, first):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return first.result()
        finally:
            for task in (reserved, first):
                task.cancel()

    async def _alive(self, worker: _Worker) -> bool:
        try:
            await asyncio.wait_for(worker.actor.ready.remote(), HEALTH_TIMEOUT_S)
            return True
        except WorkerGone:
            return False

    async def _abort_everywhere(self, request: GenerateRequest, workers: list[_Worker]) -> None:
        """Tell every holder of the attempt's state to free it now; shielded so a cancel cannot skip it.

        The abort names the attempt: Ray does not run an async actor's calls in the order they were sent, so it may
        reach a worker before that attempt's own call does, which the worker then refuses.
        """
        calls = [
            asyncio.wait_for(w.actor.abort.remote(request.request_id, request.attempt), ABORT_TIMEOUT_S)
            for w in workers
        ]
        await asyncio.shield(asyncio.gather(*calls, return_exceptions=True))

    async def _call(self, worker: _Worker, ref):
        try:
            return await ref
        except RayActorError:
            raise WorkerDied(worker.worker_id) from None
        except RayTaskError as err:
            raise _cause(err) from None

    async def _next(self, stream, worker: _Worker) -> Any:
        try:
            ref = await stream.__anext__()
        except StopAsyncIteration:
            raise ServingError(ErrorCode.INTERNAL, f"{worker.worker_id} ended the stream early") from None
        except RayActorError:
            raise WorkerDied(worker.worker_id) from None
        return await self._call(worker, ref)

    def _tokens(self, decode: _Worker, request: GenerateRequest, start: Callable[[], Any]) -> AsyncIterator[TokenBatch]:
        """The attempt's tokens from ``decode``'s channel; ``start`` makes the call that admits it there."""
        assert decode.channel is not None  # made when the worker registered
        return decode.channel.tokens(request.request_id, request.attempt, lambda: self._call(decode, start()))

    # --- status ---

    async def status(self) -> dict[str, Any]:
        return {
            "mode": self.config.mode.value,
            "model": self.config.model.served_name,
            "inflight": len(self._inflight),
            "draining": self._draining,
            "unavailable": self.unavailable_reason(),
            "workers": self.worker_status(),
            "router": self.router.loads(),
        }

    def worker_status(self) -> list[dict[str, Any]]:
        """Each worker's state and the stats the health loop last polled (at most HEALTH_INTERVAL_S old). Not async,
        so a Prometheus collector can read it at scrape time."""
        return [
            {
                **(w.stats.__dict__ if w.stats else {}),
                "worker_id": w.worker_id,
                "role": w.role.value,  # the pool (a hybrid worker's own stats say "decode", the actor it runs)
                "healthy": w.healthy,
                "problem": w.problem,
                "restarts": w.restarts,
                "draining": w.worker_id in self._retiring,
                "device": w.info.get("device"),
                "gpu_uuid": w.info.get("gpu_uuid"),
            }
            for w in list(self.workers.values())
        ]

    async def refresh_stats(self) -> list[WorkerStats]:
        await asyncio.gather(*(self._check(w) for w in self._ready_workers()))
        return [w.stats for w in self.workers.values() if w.stats]
