"""The request path: admit a request, run it as attempts on the workers the router places it on, stream its tokens,
and retry it elsewhere when a worker dies, with the tokens already streamed appended to its prompt so the client
sees no duplicate and no gap.

An attempt (disaggregated): D reserves pages for the prompt's KV while P computes the prompt; the router hands D's
pages to P, which streams the KV into them layer by layer; P's first token and transfer report come on P's channel;
D admits the request and streams the rest on D's. Any failure or
cancel on the way is sent to both P and D as an explicit abort, so each frees its pages at once, and the router
booking is released in one place whichever way the attempt ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any, TypeVar

from ray.exceptions import RayActorError, RayTaskError

from splitserve import handoff_trace
from splitserve.cluster.call_batcher import CallBatcher
from splitserve.cluster.channel import Inbox, WorkerDied
from splitserve.cluster.health import HEALTH_TIMEOUT_S, Health
from splitserve.cluster.messages import (
    ChannelItem,
    DecodeOrder,
    ErrorCode,
    GenerateRequest,
    PagesReady,
    PrefillOrder,
    RequestTiming,
    ServingError,
    TokenBatch,
    TransferReport,
)
from splitserve.cluster.pools import Pools, WorkerHandle

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 5.0
WorkerGone = (RayActorError, asyncio.TimeoutError)
T = TypeVar("T")


def _cause(err: BaseException) -> BaseException:
    """The worker-side exception behind a Ray task error."""
    if isinstance(err, RayTaskError) and err.cause is not None:
        return err.cause
    return err


async def _traced(awaitable: Awaitable[T], event: str, request_id: str) -> T:
    result = await awaitable
    handoff_trace.mark(event, request_id)
    return result


def _settled(awaitable: Awaitable[T]) -> asyncio.Future[T]:
    """A task for a worker call's reply that is left to end by itself (never cancelled while the call is out) and
    whose failure counts as seen even where the attempt ended first and nobody asks for it."""
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


def _expect(item: ChannelItem, kind: type[T], worker: WorkerHandle) -> T:
    if not isinstance(item, kind):
        sent = type(item).__name__
        raise ServingError(ErrorCode.INTERNAL, f"{worker.worker_id} sent a {sent} where a {kind.__name__} was due")
    return item


class RequestPath:
    def __init__(self, pools: Pools, health: Health):
        self.pools = pools
        self.health = health
        self.inflight: dict[str, asyncio.Task | None] = {}
        # (worker id, method) -> the worker those calls go to (a restarted one is a new handle), and their batcher
        self._batchers: dict[tuple[str, str], tuple[WorkerHandle, CallBatcher]] = {}

    def validate(self, request: GenerateRequest) -> None:
        if (reason := self.health.unavailable_reason()) is not None:
            raise ServingError(ErrorCode.UNAVAILABLE, reason)
        if request.request_id in self.inflight:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"request_id: {request.request_id!r} is already running")
        if len(self.inflight) >= self.pools.config.router.max_queue:
            raise ServingError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{len(self.inflight)} requests in flight, the limit is router.max_queue; retry later",
            )

    async def generate(
        self, request: GenerateRequest, timing: RequestTiming | None = None
    ) -> AsyncGenerator[TokenBatch, None]:
        """Stream a request's tokens. Raises ServingError with a code the APIs map to a status."""
        self.validate(request)
        timing = timing or RequestTiming(arrival=time.monotonic())
        self.inflight[request.request_id] = asyncio.current_task()
        produced: list[int] = []
        excluded: set[str] = set()
        try:
            while True:
                attempt = replace(request, resumed_token_ids=tuple(produced), attempt=timing.retries)
                try:
                    # aclosing: a client that goes away runs the attempt's cleanup (the aborts) now, not at GC.
                    async with aclosing(self._attempt(attempt, timing, frozenset(excluded))) as batches:
                        async for batch in batches:
                            produced.extend(t.token_id for t in batch.tokens)
                            if batch.cached_prompt_tokens is not None:
                                timing.cached_prompt_tokens = batch.cached_prompt_tokens
                            if timing.first_token is None and batch.tokens:
                                timing.first_token = time.monotonic()
                            if batch.finished:
                                timing.finished = time.monotonic()
                            yield batch
                    return
                except WorkerDied as died:
                    excluded.add(died.worker_id)
                    timing.retries += 1
                    if timing.retries > self.pools.config.router.max_retries:
                        raise ServingError(
                            ErrorCode.UNAVAILABLE, f"worker {died.worker_id} died and retries are exhausted"
                        ) from None
                    log.warning("%s: worker %s died; retry %d", request.request_id, died.worker_id, timing.retries)
        finally:
            self.inflight.pop(request.request_id, None)

    async def cancel(self, request_id: str) -> bool:
        task = self.inflight.get(request_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def _attempt(
        self, request: GenerateRequest, timing: RequestTiming, exclude: frozenset[str]
    ) -> AsyncGenerator[TokenBatch, None]:
        prompt = request.engine_prompt
        placement = self.pools.router.place(
            len(prompt), request.engine_params.max_tokens, exclude, prompt=prompt, session_id=request.session_id
        )
        decode = self.pools.workers[placement.decode_worker]
        prefill = self.pools.workers[placement.prefill_worker] if placement.prefill_worker else None
        timing.decode_worker = decode.worker_id
        timing.prefill_worker = (prefill or decode).worker_id
        timing.kv_transfer_bytes = 0  # until this attempt's transfer reports
        finished = False
        using = [w.worker_id for w in (prefill, decode) if w is not None]
        self.pools.using.update(using)
        try:
            if prefill is None:
                flow = self._tokens(
                    decode, request, lambda: self._call(decode, decode.actor.start_local.remote(request))
                )
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
                self.pools.using.subtract(using)

    async def _split_flow(
        self, request: GenerateRequest, timing: RequestTiming, prefill: WorkerHandle, decode: WorkerHandle
    ) -> AsyncIterator[TokenBatch]:
        """D reserves pages while P computes the prompt and streams its KV into them; D decodes the rest.

        P queues the prompt at once and gets D's pages once they are reserved, so the reservation's round trip is off
        the first token's path. The first token waits for the reservation, though: a request D cannot take fails with
        D's error before the client sees any token, as if it had been asked first. Every call to P is a plain one that
        answers at once; its results come on its channel."""
        assert prefill.channel is not None  # made when the worker registered
        rid = request.request_id
        with prefill.channel.inbox(rid, request.attempt) as results:
            handoff_trace.mark("router.reserve", rid)
            reserved = _settled(_traced(self._batched(decode, "reserve", request), "router.reserved", rid))
            queued = _settled(self._batched(prefill, "prefill", PrefillOrder(request, decode.info["endpoint"])))
            handover = asyncio.ensure_future(self._hand_over(request, prefill, queued, reserved))
            try:
                first = await self._first_token(request, results, prefill, (reserved, queued))
                if first.finished:  # done at its first token: D's reservation is not needed, free it now (before the
                    await self._abort_everywhere(request, [decode])  # yield: a client that closes here ends us there)
                    yield first
                    return
                yield first
                transfer = asyncio.ensure_future(self._transferred(results, prefill, handover))

                def start() -> asyncio.Future[None]:
                    return self._batched(decode, "start", DecodeOrder(rid, request.attempt, first.tokens[0]))

                reported = False  # this attempt's transfer: a retry's replaces an earlier attempt's figures
                try:
                    async for batch in self._tokens(decode, request, start):
                        if not reported:
                            reported = True
                            handoff_trace.mark("router.second_token", rid)
                            # D decodes only once every layer has landed, so the report is (nearly) in by now.
                            report = await transfer
                            timing.kv_transfer_s, timing.kv_exposed_s = report.seconds, report.exposed_seconds
                            timing.kv_transfer_bytes = report.bytes
                        yield batch
                finally:
                    transfer.cancel()
            finally:
                handover.cancel()

    async def _hand_over(
        self, request: GenerateRequest, prefill: WorkerHandle, queued: asyncio.Future, reserved: asyncio.Future
    ) -> None:
        """D's pages to P once P holds the prompt (so they never overtake it) and D has reserved them. A failure of
        either call is the first token's wait to report."""
        await asyncio.shield(queued)
        pages: PagesReady = await asyncio.shield(reserved)
        await self._batched(prefill, "pages", pages)

    def _batched(self, worker: WorkerHandle, method: str, item: Any) -> asyncio.Future[Any]:
        """``worker.method`` for ``item``, sent with the other items submitted while its previous call is out; the
        item's answer."""
        key = (worker.worker_id, method)
        known = self._batchers.get(key)
        if known is None or known[0] is not worker:

            async def send(items: list[Any]) -> Any:
                return await self._call(worker, getattr(worker.actor, method).remote(items))

            known = self._batchers[key] = (worker, CallBatcher(send))
        return known[1].submit(item)

    async def _first_token(
        self, request: GenerateRequest, results: Inbox, prefill: WorkerHandle, calls: tuple[asyncio.Future, ...]
    ) -> TokenBatch:
        """P's first token once D has reserved the pages (``calls``: D's reservation, P's taking the prompt); whichever
        fails first ends the wait, D's failure winning where several did: the client sees D's refusal, as if D had
        been asked first."""
        first = asyncio.ensure_future(_traced(results.next(), "router.first_token", request.request_id))
        try:
            await asyncio.wait((*calls, first), return_when=asyncio.FIRST_EXCEPTION)
            for task in (*calls, first):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return _expect(first.result(), TokenBatch, prefill)
        finally:
            first.cancel()

    async def _transferred(self, results: Inbox, prefill: WorkerHandle, handover: asyncio.Task) -> TransferReport:
        await handover
        return _expect(await results.next(), TransferReport, prefill)

    async def _alive(self, worker: WorkerHandle) -> bool:
        try:
            await asyncio.wait_for(worker.actor.ready.remote(), HEALTH_TIMEOUT_S)
            return True
        except WorkerGone:
            return False

    async def _abort_everywhere(self, request: GenerateRequest, workers: list[WorkerHandle]) -> None:
        """Tell every holder of the attempt's state to free it now; shielded so a cancel cannot skip it.

        The abort names the attempt: Ray does not run an async actor's calls in the order they were sent, so it may
        reach a worker before that attempt's own call does, which the worker then refuses.
        """
        calls = [
            asyncio.wait_for(w.actor.abort.remote(request.request_id, request.attempt), ABORT_TIMEOUT_S)
            for w in workers
        ]
        await asyncio.shield(asyncio.gather(*calls, return_exceptions=True))

    async def _call(self, worker: WorkerHandle, ref):
        try:
            return await ref
        except RayActorError:
            raise WorkerDied(worker.worker_id) from None
        except RayTaskError as err:
            raise _cause(err) from None

    def _tokens(
        self, decode: WorkerHandle, request: GenerateRequest, start: Callable[[], Awaitable[Any]]
    ) -> AsyncIterator[TokenBatch]:
        """The attempt's tokens from ``decode``'s channel (or its failure there); ``start`` makes the call that admits
        it there."""
        assert decode.channel is not None  # made when the worker registered
        return decode.channel.tokens(request.request_id, request.attempt, start)
