"""The prompt-phase worker: packs queued prompts into batches of at most ``max_batch_tokens``, computes them, and
streams each layer's KV pages to the request's decode worker as soon as that layer is done.

A prompt is queued while its decode worker still reserves the pages for it (the router asks both at once, and
hands the pages over in ``pages`` once reserved): layers done before the pages are known wait in the transfer
(``DeferredSend``) and go the moment they are.

Per request it posts two items on its channel to the router (``outputs``): the first token (as soon as the prompt
is computed), then a ``TransferReport`` once the KV has landed; or the request's failure. Every call a request
makes here is a plain, short one, so the control group's aborts never queue behind Ray's work for the others.

A request's pages are read only by the gathers of its own pass, on the engine thread; every backend is handed those
gathered copies, never the pages. The pages are still held until the transfer has finished, so that the copies in
flight never outgrow the KV cache; an abort drops the copies, so an aborted request's pages are freed at once, while
its pass still runs too (the passes that can write them again are queued behind that one).

Where either side is a tensor-parallel group, a request's transfer is one per link: every rank of this worker sends
the KV heads it holds straight to the decode ranks that hold them (``rank_sends.py``), and the request's transfer
has ended only once every rank's part has.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import ray

from splitserve import handoff_trace
from splitserve.cluster.messages import (
    ChannelMessage,
    ErrorCode,
    GenerateRequest,
    PagesReady,
    PrefillOrder,
    ServingError,
    StreamFailure,
    Token,
    TokenBatch,
    TransferReport,
)
from splitserve.cluster.worker_options import WorkerOptions
from splitserve.engine.block_manager import OutOfBlocks
from splitserve.engine.engine import RequestError
from splitserve.engine.sequence import Sequence
from splitserve.kv_transfer import ReceiverEndpoint, TransferAborted, TransferError
from splitserve.prefill_worker.rank_sends import PrefillTransfers, RequestSend
from splitserve.roles import Role
from splitserve.worker_base import WorkerBase
from splitserve.worker_common import CONTROL_GROUP, AbortedAttempts

log = logging.getLogger(__name__)


_job_ids = itertools.count()


class _Stage(Enum):
    """Who owns a job's next move. Changed only under the worker's ``_lock``, so an abort always knows it."""

    QUEUED = "queued"  # in the queue, holding no pages: an abort takes it out and fails it at once
    COMPUTING = "computing"  # in the pass in flight: an abort frees its pages at the pass's next layer, and the
    # pass's end aborts its transfer
    TRANSFERRING = "transferring"  # its pass ended: a wait thread follows its transfer; an abort frees its pages


@dataclass(eq=False)
class _Job:
    request: GenerateRequest
    endpoint: ReceiverEndpoint
    # The engine's id for this job: unique per attempt, so a retry of the same request arriving while the aborted
    # attempt's transfer is still winding down never shares (and never frees) the other's pages.
    key: str = field(default_factory=lambda: f"job-{next(_job_ids)}")
    pages: Future = field(default_factory=Future)  # the decode worker's PagesReady, once it came
    first: Future = field(default_factory=Future)  # TokenBatch with the first token
    transferred: Future = field(default_factory=Future)  # TransferReport
    handle: RequestSend | None = None
    backend: str = ""
    started: float = 0.0  # the transfer's begin
    sampled: float = 0.0  # the first token's
    stage: _Stage = _Stage.QUEUED
    aborted: bool = False


def _cancelled(job: _Job) -> ServingError:
    return ServingError(ErrorCode.CANCELLED, f"{job.request.request_id} aborted")


class PrefillWorker(WorkerBase):
    role = Role.PREFILL

    def __init__(self, worker_id: str, options: WorkerOptions):
        super().__init__(worker_id, options)
        # Releases are logged by request id (``_release``): the engine knows the jobs by their per-attempt key.
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}
        control = self.followers.control if self.followers is not None else None
        self._transfers = PrefillTransfers(self.engine.runner, options.kv_transfer, control)
        self._aborted_early = AbortedAttempts()
        self._reporting: set[asyncio.Task] = set()  # each job's ``_report``, held until it ends
        # abort() runs on the control group's loop, prefill() and pages() on the default loop, passes on the engine
        # thread: each one's look-then-act on _jobs, _queue, _aborted_early, job.stage, job.handle, job.pages and
        # job.aborted holds this lock (never across an await nor a blocking call), so an abort never waits for a pass.
        self._lock = threading.Lock()
        # Jobs whose transfer has ended, or that were aborted after their pass began: their pages are freed at the
        # next layer of a pass in flight, while it waits for the device, or before the next step, whichever is first.
        self._to_free: deque[_Job] = deque()

    # --- engine thread ---

    def _take_batch(self) -> list[_Job]:
        budget = self.options.max_batch_tokens
        batch: list[_Job] = []
        with self._lock:
            while self._queue:
                job = self._queue[0]
                n = len(job.request.engine_prompt)
                if batch and n > budget:
                    break
                self._queue.popleft()
                job.stage = _Stage.COMPUTING
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
                seqs.append(self.engine.make_sequence(job.key, job.request.engine_prompt, job.request.engine_params))
                runnable.append(job)
                handoff_trace.mark("prefill.pass_launched", job.request.request_id)
            except RequestError as err:
                self._fail(job, ServingError(ErrorCode.INVALID_ARGUMENT, str(err)))
        if not runnable:
            return self._has_queued()
        by_id = {job.key: job for job in runnable}
        try:
            outputs = self.engine.prefill(seqs, hook_for=lambda done: self._layer_hook(done, by_id))
        except OutOfBlocks:
            # Nothing was allocated. Pages come back as transfers finish; retry this batch then (release() wakes
            # the thread). A job aborted meanwhile is not requeued: its abort left it to this pass.
            with self._lock:
                retry = [job for job in runnable if not job.aborted]
                for job in retry:
                    job.stage = _Stage.QUEUED
                self._queue.extendleft(reversed(retry))
            for job in runnable:
                if job.aborted:
                    self._fail(job, _cancelled(job))
            return False
        except Exception as err:
            for job in runnable:
                self._abort_transfer(job, f"prefill failed: {err}")
                self._fail(job, ServingError(ErrorCode.INTERNAL, f"prefill failed: {err}"))
            raise
        firsts = {out.request_id: out for out in outputs}
        for job in runnable:
            with self._lock:
                job.stage = _Stage.TRANSFERRING
                aborted = job.aborted
            if aborted:  # during the pass: nobody wants the token, and its abort had its pages freed meanwhile
                job.first.set_exception(_cancelled(job))
                if job.handle is None:  # freed before its last chunk's pass: it never began a transfer
                    self._release(job)
                else:
                    self._await_transfer(job, abort="aborted by the router")
                continue
            out = firsts[job.key]
            token = Token(out.token_id, out.text, out.logprob)
            batch = TokenBatch(
                job.request.request_id,
                [token],
                out.finished,
                out.finish_reason,
                job.request.attempt,
                cached_prompt_tokens=out.cached_prompt_tokens,
            )
            job.sampled = time.perf_counter()
            handoff_trace.mark("prefill.first_token", job.request.request_id)
            job.first.set_result(batch)
            if out.finished:  # nothing to decode: the KV never needs to leave (the receiver is told, by message)
                self._await_transfer(job, abort="finished at the first token")
            else:
                self._await_transfer(job)
        return self._has_queued()

    def _has_queued(self) -> bool:
        with self._lock:
            return bool(self._queue)

    def _layer_hook(self, completing: list[Sequence], jobs: dict[str, _Job]):
        """Open a transfer per completing sequence (on every rank: the followers' orders go with the pass's step);
        the hook then ships each layer's pages as it is done."""
        runner = self.engine.runner
        sends = []
        for seq in completing:
            job = jobs[seq.request_id]
            rid = job.request.request_id
            handle = self._transfers.begin(job.key, rid, seq.num_prompt_tokens, seq.block_table, job.endpoint)
            job.backend = handle.backend
            with self._lock:
                job.handle = handle
                aborted = job.aborted
            job.started = time.perf_counter()
            if aborted:  # never opened: its layers are dropped, and the pass's end frees its pages
                handle.fail(TransferAborted("aborted by the router"))
            else:
                self._open_transfer(job)
            sends.append((job, handle))
        self._transfers.hand_over()

        last_layer = runner.spec.num_layers - 1

        def on_layer(layer: int) -> None:
            for job, handle in sends:
                handle.send_layer(layer)
                if layer == last_layer:
                    handoff_trace.mark("prefill.last_layer", job.request.request_id)
            self._free_released()

        return on_layer

    def _open_transfer(self, job: _Job) -> None:
        """Begin the job's transfer if its pass began and its pages are known. Called by both, the engine thread's
        layer hook and the pages' arrival: whichever comes second opens it. Pages that never come (the decode worker
        refused the request) are the router's to report, and its abort ends the transfer."""
        handle = job.handle
        if handle is None or handle.settled or not job.pages.done():
            return
        handoff_trace.mark("prefill.transfer_begin", job.request.request_id)
        pages: PagesReady = job.pages.result()
        handle.open(pages.block_ids, skip_blocks=pages.cached_tokens // self.engine.runner.block_size)

    def _await_transfer(self, job: _Job, abort: str | None = None) -> None:
        """On the engine thread, at the end of the job's pass: wait for delivery (or for ``abort`` to be acknowledged)
        on a thread of its own, then free the pages. An aborted transfer's pages are freed now."""

        handle = job.handle
        assert handle is not None, "a transfer starts in the layer hook, before any first token"

        def wait() -> None:
            try:
                if abort is not None:
                    handle.abort(abort)
                sent = handle.finish()
                done = time.perf_counter()
                handoff_trace.mark("prefill.transfer_done", job.request.request_id)
                backend = self.options.kv_transfer.backend.value
                request = job.request
                seconds, exposed = done - job.started, max(0.0, done - job.sampled)
                job.transferred.set_result(
                    TransferReport(request.request_id, request.attempt, seconds, exposed, int(sent or 0), backend)
                )
            except TransferAborted as err:  # either side's abort: the request is over, not failed
                job.transferred.set_exception(ServingError(ErrorCode.CANCELLED, f"KV transfer aborted: {err}"))
            except TransferError as err:
                job.transferred.set_exception(ServingError(ErrorCode.UNAVAILABLE, f"KV transfer failed: {err}"))
            except BaseException as err:  # never leave the router waiting, nor the pages held
                job.transferred.set_exception(ServingError(ErrorCode.INTERNAL, f"KV transfer failed: {err!r}"))
                raise
            finally:
                self._free_soon(job)

        threading.Thread(target=wait, name=f"transfer-{job.request.request_id}", daemon=True).start()
        if abort is not None:
            self._release(job)

    def _abort_transfer(self, job: _Job, reason: str) -> None:
        if job.handle is not None:
            try:
                job.handle.abort(reason)
            except Exception:
                log.exception("abort of %s", job.request.request_id)

    def _free_soon(self, job: _Job) -> None:
        """Any thread: have the engine thread free the job's pages at its next chance (idempotent)."""
        self._to_free.append(job)
        self._thread.submit(self._free_released, during_step=True)

    def _free_released(self) -> None:
        """Holding the engine (between two layers of a pass, or while one waits for the device). The jobs here are
        past their pass, or aborted in the pass in flight; either way no pass can write their pages before the one
        in flight ends (the next is queued behind it on the same stream), the pass in flight allocated its pages
        before it began, and transfers send the copies each layer gathered, never the pages. A job released in the
        pass in flight gets no first token from it and no further pass (``Engine.prefill``)."""
        while self._to_free:
            self._release(self._to_free.popleft())

    def _release(self, job: _Job) -> None:
        if self.engine.release(job.key):
            self.releases.record(job.request.request_id)
        self._forget(job)
        self._thread.wake()

    def _fail(self, job: _Job, err: BaseException) -> None:
        for fut in (job.first, job.transferred):
            if not fut.done():
                fut.set_exception(err)
        self._forget(job)

    def _forget(self, job: _Job) -> None:
        with self._lock:
            if self._jobs.get(job.request.request_id) is job:
                del self._jobs[job.request.request_id]

    # --- actor API ---

    async def ready(self) -> dict:
        self._loop = asyncio.get_running_loop()
        return self._info()

    async def outputs(self) -> AsyncIterator[ChannelMessage]:
        """The channel: one long-lived stream to the router carrying every request's first token, transfer report
        or failure. One reader: the cluster opens it once the worker is ready."""
        async for message in self._outbox.messages():
            yield message

    async def prefill(self, orders: list[PrefillOrder]) -> list[ServingError | None]:
        """Queue the prompts and answer at once, per prompt, None or why it was not taken: each one's first token,
        then its ``TransferReport`` (or its failure), follow on the channel, and the decode worker's pages come in
        ``pages``. A prompt whose abort came first is refused without a word: whoever aborted it waits for nothing
        from it. The router batches these calls (``CallBatcher``): few calls, so an abort never waits behind many."""
        refusals = [self._take(order.request, order.endpoint) for order in orders]
        self._thread.wake()
        return refusals

    def _take(self, request: GenerateRequest, endpoint: ReceiverEndpoint) -> ServingError | None:
        job = _Job(request, endpoint)
        with self._lock:
            if self._aborted_early.claim(request.request_id, request.attempt):
                return None
            previous = self._jobs.get(request.request_id)
            if previous is not None and not previous.aborted:  # an aborted attempt may still be winding down: fine
                return ServingError(ErrorCode.INVALID_ARGUMENT, f"request_id: {request.request_id!r} is already here")
            if len(self._jobs) >= self.options.max_queue:
                return ServingError(ErrorCode.RESOURCE_EXHAUSTED, f"{self.worker_id}: queue full")
            self._jobs[request.request_id] = job
            self._queue.append(job)
        handoff_trace.mark("prefill.queued", request.request_id)
        self._reporting.add(task := asyncio.ensure_future(self._report(job)))
        task.add_done_callback(self._reporting.discard)
        return None

    async def pages(self, handovers: list[PagesReady]) -> None:
        """The decode worker's pages for each attempt's KV: its transfer opens now, or when its pass reaches it. The
        router sends them only once ``prefill`` has answered, so the job is here unless it has ended meanwhile."""
        for pages in handovers:
            with self._lock:
                job = self._jobs.get(pages.request_id)
                if job is None or job.request.attempt != pages.attempt or job.aborted or job.pages.done():
                    continue
                job.pages.set_result(pages)
            self._open_transfer(job)

    async def _report(self, job: _Job) -> None:
        """Post the job's first token, then its transfer report; or the failure that ended it (an aborted job's
        too: it is dropped at the router unless someone still reads that attempt)."""
        request = job.request
        completed = False
        try:
            first = await asyncio.wrap_future(job.first)
            self._outbox.post([first])
            completed = first.finished
            if not completed:
                self._outbox.post([await asyncio.wrap_future(job.transferred)])
                completed = True
        except Exception as err:
            error = err if isinstance(err, ServingError) else ServingError(ErrorCode.INTERNAL, repr(err))
            self._outbox.post([StreamFailure(request.request_id, request.attempt, error)])
        finally:
            if not completed:  # something failed: free everything now
                self._abort_job(job)

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def abort(self, request_id: str, attempt: int | None = None) -> bool:
        """Drop the request wherever it is: queued, computing, or transferring (the receiver is told).

        With ``attempt`` (the router's aborts), an attempt not seen yet is remembered and refused when it arrives.
        Answers without waiting for the engine thread: the pages are freed at the pass's next layer, and what else
        must happen there, the pass in flight does at its end.
        """
        self.aborts.record(request_id)
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None or (attempt is not None and job.request.attempt != attempt):
                if attempt is not None:
                    self._aborted_early.add(request_id, attempt)
                return False
        return self._abort_job(job)

    def _abort_job(self, job: _Job) -> bool:
        """Any thread. A queued job leaves the queue now (it holds no pages); one in the pass in flight has its pages
        freed at the pass's next layer (or once the pass waits for the device) and its transfer aborted at the pass's
        end (``_step``); a transferring one has its transfer aborted and its pages freed."""
        with self._lock:
            if job.aborted:
                return False
            job.aborted = True
            stage = job.stage
            if stage is _Stage.QUEUED:
                self._queue.remove(job)
        if stage is _Stage.QUEUED:
            self._fail(job, _cancelled(job))
        elif stage is _Stage.COMPUTING:
            self._free_soon(job)  # its pass's end aborts its transfer
        elif stage is _Stage.TRANSFERRING:
            # On a thread of its own: abort() waits for the receiver's answer. The pages need not: no send reads them.
            threading.Thread(
                target=self._abort_transfer,
                args=(job, "aborted by the router"),
                name=f"abort-{job.request.request_id}",
                daemon=True,
            ).start()
            self._free_soon(job)
        return True

    def _load(self) -> dict[str, Any]:
        with self._lock:
            queued = list(self._queue)
            jobs = len(self._jobs)
        return {
            "queued_requests": len(queued),
            "active_requests": len(self.engine.held),
            "pending_prefill_tokens": sum(len(j.request.engine_prompt) for j in queued),
            "extra": {"jobs": float(jobs)},
        }
