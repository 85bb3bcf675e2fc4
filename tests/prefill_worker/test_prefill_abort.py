"""A prefill worker's abort answers without waiting for the engine thread, and frees what the request holds as soon
as nothing can use it: a queued prompt at once, one in the pass in flight at that pass's end. An aborted request gets
no first token; its end (CANCELLED) goes on the worker's channel, where the router drops what nobody reads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

from splitserve.cluster.messages import (
    ChannelItem,
    ErrorCode,
    PagesReady,
    PrefillOrder,
    ServingError,
    StreamFailure,
    TokenBatch,
    TransferReport,
)
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.kv_transfer import ReceiverEndpoint, TransferSpec
from splitserve.prefill_worker.worker import PrefillWorker
from tests.in_process import decode_worker, prefill_worker, tiny_request

# A receiver nobody runs: these tests' transfers are never opened (their pages never come), so nothing dials it.
NOWHERE = ReceiverEndpoint("nobody", "localhost", 0, "cpu", address="127.0.0.1:1", backends=("grpc",))
ANSWER_S = 10  # generous for a loaded 2-core machine; an abort that waits for the gated pass never answers


class ChannelReader:
    """Reads an in-process worker's channel (``outputs``) as the router would, keeping each request's items."""

    def __init__(self, worker: PrefillWorker):
        self.items: dict[str, list[ChannelItem]] = {}
        self._arrived = asyncio.Event()
        self._pump = asyncio.ensure_future(self._read(worker))

    async def _read(self, worker: PrefillWorker) -> None:
        async for message in worker.outputs():
            for item in message:
                self.items.setdefault(item.request_id, []).append(item)
            self._arrived.set()

    async def ended(self, request_id: str) -> list[ChannelItem]:
        """The request's items once its last one (a failure, a transfer report, a finished token) came."""

        def done(items: list[ChannelItem]) -> bool:
            last = items[-1]
            return not isinstance(last, TokenBatch) or last.finished

        while not (items := self.items.get(request_id, [])) or not done(items):
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), ANSWER_S)
        return items

    async def first(self, request_id: str) -> ChannelItem:
        while not self.items.get(request_id):
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), ANSWER_S)
        return self.items[request_id][0]

    def close(self) -> None:
        self._pump.cancel()


def _cancelled_only(items: list[ChannelItem]) -> bool:
    return len(items) == 1 and isinstance(items[0], StreamFailure) and items[0].error.code == ErrorCode.CANCELLED


def _run_with_prefill_worker(model_dir, scenario: Callable[[PrefillWorker, ChannelReader], Awaitable[None]]) -> None:
    async def run() -> None:
        async with prefill_worker(model_dir) as worker:
            channel = ChannelReader(worker)
            try:
                await scenario(worker, channel)
            finally:
                channel.close()

    asyncio.run(asyncio.wait_for(run(), 120))


def _gate_passes(worker: PrefillWorker) -> tuple[threading.Event, threading.Event]:
    """Hold every pass at its first layer until ``release`` is set; ``in_pass`` is set once one is held there."""
    in_pass, release = threading.Event(), threading.Event()
    real_hook = worker._layer_hook

    def gated_hook(completing, jobs):
        on_layer = real_hook(completing, jobs)

        def gated(layer: int) -> None:
            if layer == 0:
                in_pass.set()
                release.wait()
            on_layer(layer)

        return gated

    worker._layer_hook = gated_hook  # type: ignore[method-assign]
    return in_pass, release


def test_an_aborted_queued_prompt_leaves_the_queue_without_any_pass(tiny_model_dir):
    async def scenario(worker: PrefillWorker, channel: ChannelReader) -> None:
        in_pass, release = _gate_passes(worker)
        running = tiny_request("r-running", prompt_len=40)
        assert await worker.prefill([PrefillOrder(running, NOWHERE)]) == [None]  # its pages never come
        await asyncio.to_thread(in_pass.wait, ANSWER_S)
        assert in_pass.is_set()
        # Answered at once: queued behind the held pass.
        assert await worker.prefill([PrefillOrder(tiny_request("r-queued", prompt_len=40), NOWHERE)]) == [None]
        assert "r-queued" in worker._jobs

        assert await asyncio.wait_for(worker.abort("r-queued", 0), ANSWER_S)  # while the pass is still held
        assert _cancelled_only(await channel.ended("r-queued"))  # no token, just its end
        assert not worker._queue and "r-queued" not in worker._jobs
        assert "r-queued" not in worker.releases.snapshot()  # it never held pages
        release.set()
        await worker.abort("r-running", 0)
        await channel.ended("r-running")

    _run_with_prefill_worker(tiny_model_dir, scenario)


def test_each_prompt_of_a_call_is_answered_on_its_own(tiny_model_dir):
    async def scenario(worker: PrefillWorker, channel: ChannelReader) -> None:
        _, release = _gate_passes(worker)
        orders = [PrefillOrder(tiny_request(rid, prompt_len=40), NOWHERE) for rid in ("r1", "r2", "r1")]
        refusals = await worker.prefill(orders)
        assert refusals[:2] == [None, None]
        assert isinstance(refusals[2], ServingError) and refusals[2].code == ErrorCode.INVALID_ARGUMENT
        assert "already here" in refusals[2].message and set(worker._jobs) == {"r1", "r2"}
        for rid in ("r1", "r2"):
            assert await worker.abort(rid, 0)
        release.set()
        for rid in ("r1", "r2"):
            assert _cancelled_only(await channel.ended(rid))

    _run_with_prefill_worker(tiny_model_dir, scenario)


def test_a_prompt_aborted_during_its_pass_frees_its_pages_when_that_pass_ends(tiny_model_dir):
    async def scenario(worker: PrefillWorker, channel: ChannelReader) -> None:
        free = worker.engine.blocks.num_free
        in_pass, release = _gate_passes(worker)
        assert await worker.prefill([PrefillOrder(tiny_request("r1", prompt_len=40), NOWHERE)]) == [None]
        await asyncio.to_thread(in_pass.wait, ANSWER_S)
        assert in_pass.is_set() and worker.engine.blocks.num_free < free

        assert await asyncio.wait_for(worker.abort("r1", 0), ANSWER_S)  # answered while the pass is held
        assert "r1" not in worker.releases.snapshot()  # the pass still computes into its pages
        release.set()
        assert _cancelled_only(await channel.ended("r1"))  # no first token for an aborted request
        for _ in range(100):  # the pass's end frees them; nothing else runs on the engine meanwhile
            if "r1" in worker.releases.snapshot():
                break
            await asyncio.sleep(0.05)
        assert "r1" in worker.releases.snapshot()
        assert worker.engine.blocks.num_free == free and not worker.engine.held and not worker._jobs

    _run_with_prefill_worker(tiny_model_dir, scenario)


Body = Callable[[PrefillWorker, ChannelReader, DecodeWorker, list[int]], Awaitable[None]]


def _with_a_receiver(model_dir, body: Body) -> None:
    """Run ``body(worker, channel, decode, dst)`` once r1 is queued on ``worker`` and a real decode worker's receiver
    expects its KV in pages ``dst``; then check that every page came back."""

    async def scenario(worker: PrefillWorker, channel: ChannelReader) -> None:
        async with decode_worker(model_dir) as decode:
            free = worker.engine.blocks.num_free
            request = tiny_request("r1", prompt_len=40)
            prompt_len = len(request.engine_prompt)
            runner = decode.engine.runner
            dst = decode.engine.blocks.allocate(decode.engine.blocks.blocks_for(prompt_len))
            decode.receiver.expect(
                TransferSpec("r1", runner.spec.num_layers, prompt_len, dst, runner.page_shape, "float32")
            )
            assert await worker.prefill([PrefillOrder(request, decode.receiver.endpoint)]) == [None]
            await body(worker, channel, decode, dst)
            for _ in range(100):
                if "r1" in worker.releases.snapshot():
                    break
                await asyncio.sleep(0.05)
            assert worker.engine.blocks.num_free == free and not worker._jobs

    _run_with_prefill_worker(model_dir, scenario)


def test_the_first_token_comes_before_the_pages_and_the_transfer_report_after_them(tiny_model_dir):
    async def body(worker: PrefillWorker, channel: ChannelReader, decode: DecodeWorker, dst: list[int]) -> None:
        await worker.pages([PagesReady("r1", 1, dst)])  # another attempt's: not this job's pages
        assert not worker._jobs["r1"].pages.done()
        first = await channel.first("r1")  # the reservation's round trip is not on the first token's path
        assert isinstance(first, TokenBatch) and not first.finished and first.attempt == 0
        await worker.pages([PagesReady("r1", 0, dst)])
        items = await channel.ended("r1")
        assert items[0] is first and len(items) == 2
        report = items[1]
        assert isinstance(report, TransferReport) and (report.request_id, report.attempt) == ("r1", 0)
        assert report.bytes > 0

    _with_a_receiver(tiny_model_dir, body)


def test_a_transfer_the_receiver_aborted_ends_as_cancelled_and_frees_the_pages(tiny_model_dir):
    """The decode worker's abort reaches the sender before the router's reaches the prefill worker: the request ends
    as CANCELLED on the channel (no transfer report), and the pages still come back."""

    async def body(worker: PrefillWorker, channel: ChannelReader, decode: DecodeWorker, dst: list[int]) -> None:
        first = await channel.first("r1")
        assert isinstance(first, TokenBatch) and not first.finished
        decode.receiver.abort("r1")  # before the pages reach the prefill worker: its transfer meets the abort
        await worker.pages([PagesReady("r1", 0, dst)])
        items = await channel.ended("r1")
        assert items[0] is first and _cancelled_only(items[1:])

    _with_a_receiver(tiny_model_dir, body)
