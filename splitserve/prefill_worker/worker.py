"""The prompt-phase worker: packs queued prompts into batches of at most ``max_batch_tokens``, computes them, and
streams each layer's KV pages to the request's decode worker as soon as that layer is done.

Per request it streams two messages back to the router: the first token (as soon as the prompt is computed), then
a ``TransferReport`` once the KV has landed. Source pages are held until the transfer has finished or been aborted,
never less, so no send can read a page that was reused.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from splitserve.cluster.messages import (
    ErrorCode,
    GenerateRequest,
    ServingError,
    Token,
    TokenBatch,
    TransferReport,
    WorkerStats,
)
from splitserve.cluster.worker_options import WorkerOptions
from splitserve.engine.block_manager import OutOfBlocks
from splitserve.engine.engine import Engine, RequestError
from splitserve.engine.engine_thread import EngineThread
from splitserve.engine.sequence import Sequence
from splitserve.kv_transfer import ReceiverEndpoint, Sender, SendHandle, TransferError, TransferSpec, make_sender
from splitserve.worker_common import configure_worker_process, describe_device

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    request: GenerateRequest
    endpoint: ReceiverEndpoint
    dst_blocks: list[int]
    first: Future = field(default_factory=Future)  # TokenBatch with the first token
    transferred: Future = field(default_factory=Future)  # TransferReport
    handle: SendHandle | None = None
    backend: str = ""
    started: float = 0.0
    aborted: bool = False


class PrefillWorker:
    def __init__(self, worker_id: str, options: WorkerOptions):
        configure_worker_process()
        self.worker_id = worker_id
        self.options = options
        self.engine = Engine(options.engine_config())
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}
        self._senders: dict[ReceiverEndpoint, Sender] = {}
        self._thread = EngineThread(self._step, name=f"{worker_id}-engine")

    # --- engine thread ---

    def _take_batch(self) -> list[_Job]:
        budget = self.options.max_batch_tokens
        batch: list[_Job] = []
        while self._queue:
            job = self._queue[0]
            n = len(job.request.engine_prompt)
            if batch and n > budget:
                break
            self._queue.popleft()
            if job.aborted:
                continue
            batch.append(job)
            budget -= n
        return batch

    def _step(self) -> bool:
        jobs = self._take_batch()
        if not jobs:
            return False
        seqs: list[Sequence] = []
        runnable: list[_Job] = []
        for job in jobs:
            try:
                seqs.append(
                    self.engine.make_sequence(
                        job.request.request_id, job.request.engine_prompt, job.request.engine_params
                    )
                )
                runnable.append(job)
            except RequestError as err:
                self._fail(job, ServingError(ErrorCode.INVALID_ARGUMENT, str(err)))
        if not runnable:
            return bool(self._queue)
        by_id = {job.request.request_id: job for job in runnable}
        try:
            outputs = self.engine.prefill(seqs, hook_for=lambda done: self._layer_hook(done, by_id))
        except OutOfBlocks:
            # Pages come back as transfers finish; retry this batch then (release() wakes the thread).
            self._queue.extendleft(reversed(runnable))
            return False
        except Exception as err:
            for job in runnable:
                self._abort_transfer(job, f"prefill failed: {err}")
                self._fail(job, ServingError(ErrorCode.INTERNAL, f"prefill failed: {err}"))
            raise
        for out in outputs:
            job = by_id[out.request_id]
            batch = TokenBatch(
                out.request_id, [Token(out.token_id, out.text, out.logprob)], out.finished, out.finish_reason
            )
            job.first.set_result(batch)
            if out.finished:  # nothing to decode: the KV never needs to leave
                self._abort_transfer(job, "finished at the first token")
                self._release(job)
            else:
                self._await_transfer(job)
        return bool(self._queue)

    def _layer_hook(self, completing: list[Sequence], jobs: dict[str, _Job]):
        """Open a transfer per completing sequence; the hook then ships each layer's pages as it is done."""
        runner = self.engine.runner
        sends = []
        for seq in completing:
            job = jobs[seq.request_id]
            sender = self._sender(job.endpoint)
            job.backend = sender.backend
            job.handle = sender.begin(
                TransferSpec(
                    request_id=seq.request_id,
                    num_layers=runner.spec.num_layers,
                    num_tokens=seq.num_prompt_tokens,
                    dst_block_ids=job.dst_blocks,
                    page_shape=runner.page_shape,
                    dtype=str(runner.dtype).removeprefix("torch."),
                )
            )
            job.started = time.perf_counter()
            sends.append((job.handle, seq.block_table))

        def on_layer(layer: int) -> None:
            for handle, blocks in sends:
                handle.send_layer(layer, runner.gather_pages(layer, blocks))

        return on_layer

    def _sender(self, endpoint: ReceiverEndpoint) -> Sender:
        sender = self._senders.get(endpoint)
        if sender is None:
            sender = make_sender(self.options.kv_transfer, endpoint, self.engine.runner.device)
            self._senders[endpoint] = sender
        return sender

    def _await_transfer(self, job: _Job) -> None:
        """Wait for delivery off the engine thread; release the source pages only after the last write."""

        handle = job.handle
        assert handle is not None, "a transfer starts in the layer hook, before any first token"

        def wait() -> None:
            try:
                sent = handle.finish()
                job.transferred.set_result(
                    TransferReport(
                        time.perf_counter() - job.started, int(sent or 0), self.options.kv_transfer.backend.value
                    )
                )
            except TransferError as err:
                job.transferred.set_exception(ServingError(ErrorCode.UNAVAILABLE, f"KV transfer failed: {err}"))
            finally:
                self._thread.submit(lambda: self._release(job))

        threading.Thread(target=wait, name=f"transfer-{job.request.request_id}", daemon=True).start()

    def _abort_transfer(self, job: _Job, reason: str) -> None:
        if job.handle is not None:
            try:
                job.handle.abort(reason)
            except Exception:
                log.exception("abort of %s", job.request.request_id)

    def _release(self, job: _Job) -> None:
        self.engine.release(job.request.request_id)
        self._jobs.pop(job.request.request_id, None)
        self._thread.wake()

    def _fail(self, job: _Job, err: BaseException) -> None:
        for fut in (job.first, job.transferred):
            if not fut.done():
                fut.set_exception(err)
        self._jobs.pop(job.request.request_id, None)

    # --- actor API ---

    async def ready(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "role": "prefill",
            "kv_blocks": self.engine.runner.num_kv_blocks,
            "block_size": self.engine.runner.block_size,
            "max_model_len": self.engine.max_model_len,
            "vocab_size": self.engine.spec.vocab_size,
            **describe_device(self.engine.runner.device),
        }

    async def prefill(
        self, request: GenerateRequest, endpoint: ReceiverEndpoint, dst_blocks: list[int]
    ) -> AsyncIterator[TokenBatch | TransferReport]:
        """Yields the first token (a TokenBatch), then a TransferReport when the KV is in the decode worker."""
        job = _Job(request, endpoint, list(dst_blocks))
        if request.request_id in self._jobs:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"request_id: {request.request_id!r} is already here")
        if len(self._jobs) >= self.options.max_queue:
            raise ServingError(ErrorCode.RESOURCE_EXHAUSTED, f"{self.worker_id}: queue full")
        self._jobs[request.request_id] = job
        await asyncio.wrap_future(self._thread.submit(lambda: self._queue.append(job)))
        completed = False
        try:
            first = await asyncio.wrap_future(job.first)
            completed = first.finished
            yield first
            if not completed:
                yield await asyncio.wrap_future(job.transferred)
                completed = True
        finally:
            if not completed:  # the router went away, or something failed: free everything now
                await self.abort(request.request_id)

    async def abort(self, request_id: str) -> bool:
        """Drop the request wherever it is: queued, computing, or transferring (the receiver is told)."""
        job = self._jobs.get(request_id)
        if job is None:
            return False
        job.aborted = True

        def drop() -> None:
            self._abort_transfer(job, "aborted by the router")
            if job in self._queue:
                self._queue.remove(job)
                self._fail(job, ServingError(ErrorCode.CANCELLED, f"{request_id} aborted"))
            elif job.handle is None:
                self._fail(job, ServingError(ErrorCode.CANCELLED, f"{request_id} aborted"))

        await asyncio.wrap_future(self._thread.submit(drop))
        return True

    async def stats(self) -> WorkerStats:
        def collect() -> WorkerStats:
            e = self.engine
            return WorkerStats(
                worker_id=self.worker_id,
                role="prefill",
                queued_requests=len(self._queue),
                active_requests=len(e.held),
                pending_prefill_tokens=sum(len(j.request.engine_prompt) for j in self._queue),
                kv_blocks_total=e.blocks.num_blocks,
                kv_blocks_free=e.blocks.num_free,
                prefix_cache_hits=e.blocks.prefix_hits,
                extra={"engine_failed": float(self._thread.error is not None), "time": time.time()},
            )

        return await asyncio.wrap_future(self._thread.submit(collect))
