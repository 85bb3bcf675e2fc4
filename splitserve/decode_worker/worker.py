"""The token-phase worker: receives prompts' KV pages, decodes them in one continuous batch, streams tokens back
to the router on one token channel (``outputs``) for all its requests.

It also runs whole requests itself (``start_local``): the colocated baseline, a ``hybrid`` pool worker, and a decode
worker the ``borrow_idle`` policy lends a prompt to while the prefill pool is backed up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

import ray

from splitserve import handoff_trace
from splitserve.cluster.messages import (
    ChannelMessage,
    DecodeOrder,
    ErrorCode,
    GenerateRequest,
    PagesReady,
    ServingError,
    StreamFailure,
    Token,
    TokenBatch,
)
from splitserve.cluster.worker_options import WorkerOptions
from splitserve.decode_worker.rank_receiver import decode_receiver
from splitserve.engine.block_manager import OutOfBlocks
from splitserve.engine.engine import RequestError, TokenOutput
from splitserve.kv_transfer import TransferError, TransferResult
from splitserve.roles import Role
from splitserve.worker_base import WorkerBase, transfer_spec
from splitserve.worker_common import CONTROL_GROUP, AbortedAttempts

log = logging.getLogger(__name__)
_FAILED_MEMORY = 4096


class DecodeWorker(WorkerBase):
    role = Role.DECODE
    _stats_during_step = True  # its stats only read counts, which a step waiting for the device leaves alone

    def __init__(self, worker_id: str, options: WorkerOptions):
        super().__init__(worker_id, options)
        self.engine.on_release = self.releases.record
        self.receiver = decode_receiver(options, self.engine.runner, self.followers)
        # request id -> the attempt whose tokens the channel carries; only touched on the default event loop
        self._streams: dict[str, int] = {}
        self._expected: dict[str, Future[TransferResult]] = {}
        self._failed: OrderedDict[str, str] = OrderedDict()  # reservations freed because their transfer failed
        self._aborted_early = AbortedAttempts()
        self._starting: set[asyncio.Task] = set()  # each ``start``ed attempt's wait for its KV, held until it ends

    # --- engine thread ---

    def _step(self) -> bool:
        if not self.engine.has_work():
            return False
        self._deliver(self.engine.step())
        return self.engine.has_work()

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        """One hand-off to the event loop per step, whatever the batch size: the loop turns it into one message."""
        if outputs:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._publish, outputs)

    # --- the token channel (default event loop) ---

    def _publish(self, outputs: list[TokenOutput]) -> None:
        batches: dict[str, TokenBatch] = {}
        for out in outputs:
            attempt = self._streams.get(out.request_id)
            if attempt is None:
                continue  # aborted meanwhile: its stream already ended
            batch = batches.get(out.request_id)
            if batch is None:
                batch = batches[out.request_id] = TokenBatch(out.request_id, [], attempt=attempt)
            batch.tokens.append(Token(out.token_id, out.text, out.logprob))
            if out.cached_prompt_tokens is not None:  # a request it prefilled itself: its first token
                batch.cached_prompt_tokens = out.cached_prompt_tokens
            batch.finished, batch.finish_reason = out.finished, out.finish_reason
            if out.finished:
                del self._streams[out.request_id]
        if batches:
            self._post(list(batches.values()))

    def _end_stream(self, request_id: str, error: ServingError, only_attempt: int | None = None) -> None:
        """End the request's stream with ``error``; with ``only_attempt``, only if it is that attempt's."""
        attempt = self._streams.get(request_id)
        if attempt is None or (only_attempt is not None and attempt != only_attempt):
            return
        del self._streams[request_id]
        self._post([StreamFailure(request_id, attempt, error)])

    def _post(self, message: ChannelMessage) -> None:
        self._outbox.post(message)

    async def outputs(self) -> AsyncIterator[ChannelMessage]:
        """The token channel: one long-lived stream to the router carrying every request's tokens, one message per
        engine step (more when the router falls behind). Ray's cost is per message, so one channel for all requests
        carries many times the tokens a stream per request could. One reader: the cluster opens it once the worker
        is ready."""
        async for message in self._outbox.messages():
            yield message

    async def _on_engine(self, fn, during_step: bool = False):
        """``during_step`` for calls that touch nothing a step in flight uses: they need not wait for it to end."""
        return await asyncio.wrap_future(self._thread.submit(fn, during_step=during_step))

    # --- actor API ---

    async def ready(self) -> dict:
        self._loop = asyncio.get_running_loop()
        return self._info(endpoint=self.receiver.endpoint)

    async def reserve(self, requests: list[GenerateRequest]) -> list[PagesReady | ServingError]:
        """Per prompt, pages for its KV and an expectation on the receiver so the transfer can fill them; or why not.
        The prefix this worker's cache holds is reused: the pages and the transfer cover only the rest of the prompt.

        The router batches these calls (``CallBatcher``): few calls, so an abort never waits behind many in Ray's
        queue for this actor. The batch is one engine-side call, in which each prompt's pages and expectation are
        made together, as ``abort``'s cleanup is: an abort that arrives while the reservation is being made (the
        client went away meanwhile) always finds, and frees, both.
        """

        def reserve_all() -> list[PagesReady | ServingError]:
            return [self._reserve_one(request) for request in requests]

        return await self._on_engine(reserve_all, during_step=True)  # free pages only: none the step uses

    def _reserve_one(self, request: GenerateRequest) -> PagesReady | ServingError:
        """One prompt's reservation, or the error that refused it: the batch's other prompts are not affected."""
        try:
            return self._reserve(request)
        except ServingError as err:
            return err
        except OutOfBlocks as err:
            return ServingError(ErrorCode.RESOURCE_EXHAUSTED, f"{self.worker_id}: KV cache full ({err})")
        except (RequestError, ValueError) as err:
            return ServingError(ErrorCode.INVALID_ARGUMENT, str(err))
        except Exception as err:
            return ServingError(ErrorCode.INTERNAL, f"{self.worker_id}: reserving {request.request_id}: {err!r}")

    def _reserve(self, request: GenerateRequest) -> PagesReady:
        self._refuse_if_aborted(request)
        seq = self.engine.make_sequence(request.request_id, request.engine_prompt, request.engine_params)
        blocks, cached = self.engine.reserve(seq)
        spec = transfer_spec(self.engine.runner, request.request_id, len(request.engine_prompt), blocks)
        try:
            waiter = self.receiver.expect(spec)
        except BaseException:
            self.engine.abort(request.request_id)
            raise
        self._failed.pop(request.request_id, None)
        self._expected[request.request_id] = waiter
        handoff_trace.mark("decode.reserved", request.request_id)
        # Not on the waiter itself: a cuda_ipc sender may still be writing the pages when the transfer fails.
        self.receiver.unwritten(request.request_id).add_done_callback(
            lambda _: self._thread.submit(partial(self._drop_failed, request.request_id, waiter), during_step=True)
        )
        return PagesReady(request.request_id, request.attempt, blocks, cached)

    def _refuse_if_aborted(self, request: GenerateRequest) -> None:
        """On the engine thread, like abort's cleanup: an abort of this attempt that ran first has the last word."""
        if self._aborted_early.claim(request.request_id, request.attempt):
            raise ServingError(ErrorCode.CANCELLED, f"{request.request_id} was aborted before it arrived")

    def _drop_failed(self, request_id: str, waiter: Future[TransferResult]) -> None:
        """A transfer that failed before its request was admitted (the sender aborted: e.g. the prefill worker was
        told to, or the request finished at its first token; or ``start`` gave up waiting) can never land: free its
        pages as soon as no sender writes them, not when (or if) the router gets round to aborting it here."""
        if self._expected.get(request_id) is not waiter or not (waiter.cancelled() or waiter.exception()):
            return
        del self._expected[request_id]
        self.engine.abort(request_id)
        self._failed[request_id] = "cancelled" if waiter.cancelled() else str(waiter.exception())
        while len(self._failed) > _FAILED_MEMORY:
            self._failed.popitem(last=False)

    async def start(self, orders: list[DecodeOrder]) -> None:
        """Admit each attempt to the batch once its KV has landed, and answer at once: its tokens (the first one came
        from the prefill worker), or its failure, follow on the token channel. The router batches these calls too,
        and none stays open: Ray's queue for this actor holds no call per request waiting for its KV."""
        for order in orders:
            task = asyncio.ensure_future(self._start(order))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start(self, order: DecodeOrder) -> None:
        request_id = order.request_id
        try:
            await self._admit_when_landed(request_id, order.attempt, order.first_token)
        except Exception as err:
            error = err if isinstance(err, ServingError) else ServingError(ErrorCode.INTERNAL, repr(err))
            self._post([StreamFailure(request_id, order.attempt, error)])

    async def _admit_when_landed(self, request_id: str, attempt: int, first_token: Token) -> None:
        handoff_trace.mark("decode.start", request_id)
        # Left in _expected until admitted: a transfer that fails meanwhile is freed by _drop_failed.
        waiter = self._expected.get(request_id)
        if waiter is None:
            failed = self._failed.pop(request_id, None)
            if failed is not None:
                raise ServingError(ErrorCode.UNAVAILABLE, f"KV transfer failed: {failed}")
            raise ServingError(ErrorCode.INTERNAL, f"{self.worker_id}: no reservation for {request_id}")
        try:
            # Shielded: a cancel must not cancel the receiver's future behind its lock (a layer may be landing);
            # an abort fails it under that lock, so no page is written once it is freed.
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(waiter)), self.options.kv_transfer.timeout_s)
        except TransferError as err:
            raise ServingError(ErrorCode.UNAVAILABLE, f"KV transfer failed: {err}") from None
        except TimeoutError:
            if self._expected.get(request_id) is waiter:  # still this attempt's: fail it, _drop_failed frees it
                self.receiver.abort(request_id)
            raise ServingError(ErrorCode.UNAVAILABLE, "KV transfer timed out") from None
        handoff_trace.mark("decode.kv_ready", request_id)
        await self._stream_from(request_id, attempt, lambda: self._admit(request_id, waiter, first_token.token_id))

    def _admit(self, request_id: str, waiter: Future[TransferResult], first_token: int) -> None:
        if self._expected.get(request_id) is not waiter:  # aborted after its KV landed, before this call ran
            raise ServingError(ErrorCode.CANCELLED, f"{request_id} aborted")
        del self._expected[request_id]
        self.engine.admit(request_id, first_token)
        handoff_trace.mark("decode.admitted", request_id)

    async def start_local(self, request: GenerateRequest) -> None:
        """Prefill and decode here (colocated, hybrid or borrowed); the tokens follow on the token channel."""

        def add() -> None:
            self._refuse_if_aborted(request)
            self.engine.add_request(request.request_id, request.engine_prompt, request.engine_params)

        try:
            await self._stream_from(request.request_id, request.attempt, add)
        except RequestError as err:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, str(err)) from None

    async def _stream_from(self, request_id: str, attempt: int, enter: Callable[[], None]) -> None:
        """Open the request's stream, then run ``enter`` (which puts it in the batch) on the engine thread: its first
        step's tokens find the stream open."""
        self._streams[request_id] = attempt
        try:
            await self._on_engine(enter, during_step=True)  # the request joins the next step
        except BaseException:
            if self._streams.get(request_id) == attempt:
                del self._streams[request_id]
            raise
        self._thread.wake()

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def abort(self, request_id: str, attempt: int | None = None) -> bool:
        """Free everything this worker holds for the request, wherever it is (reserved, receiving, decoding).

        With ``attempt`` (the router's aborts), an attempt not seen yet is remembered and refused when it arrives.
        This runs on the control group's loop; the streams belong to the default loop, so the stream is ended there.
        """
        self.aborts.record(request_id)
        # What to wait for is taken before the abort: a reservation made in between (its call racing this one on
        # the engine's side thread) is aborted by ``drop`` below. Taken after, it would be that reservation's, never
        # done: this abort would wait on it forever and nothing else would free it.
        unwritten = self.receiver.unwritten(request_id)
        self.receiver.abort(request_id)  # at once: the sender is told
        cancelled = ServingError(ErrorCode.CANCELLED, f"{request_id} aborted")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._end_stream, request_id, cancelled)
        # A cuda_ipc sender writes the pages itself: they are freed only once it has confirmed it stopped.
        await asyncio.wrap_future(unwritten)

        def drop() -> bool | None:
            # On the engine's side thread, after any reservation submitted before this abort: that one is freed too.
            # During a step: only what no step uses is freed here; None for a request in the batch.
            self.receiver.abort(request_id)
            if not self.receiver.unwritten(request_id).done():
                return True  # made since, and a sender is writing it: _drop_failed frees it once that one stopped
            if self.engine.in_batch(request_id):
                return None
            waiter = self._expected.pop(request_id, None)
            # The receiver's abort above may have had _drop_failed free the reservation already.
            found = self.engine.abort(request_id) or waiter is not None or request_id in self._failed
            if not found and attempt is not None:
                self._aborted_early.add(request_id, attempt)
            return found

        found = await self._on_engine(drop, during_step=True)  # a reservation's pages: none a step uses
        if found is None:  # in the batch: dropped between two steps, once the step in flight is done with its pages
            await self._on_engine(partial(self.engine.abort, request_id))
            found = True
        # The request may have been admitted after the stream was ended above (its start overtook this abort): the
        # engine dropped it now, so its stream must end too, or it stays open with nothing left to finish it.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._end_stream, request_id, cancelled, attempt)
        return found

    def _load(self) -> dict[str, Any]:
        e = self.engine
        return {
            "queued_requests": len(e.waiting) + len(e.held),
            "active_requests": len(e.running),
            "pending_prefill_tokens": e.pending_prefill_tokens(),
            "batch_size": len(e.running),
            "extra": {
                "pending_transfers": float(self.receiver.pending),
                "expected": float(len(self._expected)),
                "streams": float(len(self._streams)),
            },
        }
