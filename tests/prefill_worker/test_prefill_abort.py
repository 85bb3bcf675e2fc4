"""A prefill worker's abort answers without waiting for the engine thread, and frees what the request holds as soon
as nothing can use it: a queued prompt at once, one in the pass in flight once that pass waits for the device (or at
its end). An aborted request gets no first token; its end (CANCELLED) goes on the worker's channel, where the router
drops what nobody reads."""

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
from splitserve.engine.testing import hf_greedy_reference
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


def _gate_passes(
    worker: PrefillWorker, at_layer: int = 0, after_layer: Callable[[int], None] | None = None
) -> tuple[threading.Event, threading.Event]:
    """Hold every pass before its ``at_layer``'s hook until ``release`` is set; ``in_pass`` is set once one is held
    there. ``after_layer`` runs after each layer's hook."""
    in_pass, release = threading.Event(), threading.Event()
    real_hook = worker._layer_hook

    def gated_hook(completing, jobs):
        on_layer = real_hook(completing, jobs)

        def gated(layer: int) -> None:
            if layer == at_layer:
                in_pass.set()
                release.wait()
            on_layer(layer)
            if after_layer is not None:
                after_layer(layer)

        return gated

    worker._layer_hook = gated_hook  # type: ignore[method-assign]
    return in_pass, release


def _hold_device_waits(worker: PrefillWorker) -> tuple[threading.Event, threading.Event]:
    """Hold every pass in its wait for the device, with the engine let go of as on a GPU still computing, until
    ``release`` is set; ``waiting`` is set once one is held there."""
    waiting, release = threading.Event(), threading.Event()
    device_wait = worker.engine.device_wait
    assert device_wait is not None

    def held(wait: Callable[[], None]) -> None:
        def blocked() -> None:
            waiting.set()
            release.wait()
            wait()

        device_wait(blocked)

    worker.engine.device_wait = held
    return waiting, release


async def _until(condition: Callable[[], bool]) -> bool:
    for _ in range(200):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


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


def test_a_prompt_aborted_while_its_pass_is_launched_has_its_pages_back_at_the_next_layer(tiny_model_dir):
    async def scenario(worker: PrefillWorker, channel: ChannelReader) -> None:
        free = worker.engine.blocks.num_free
        freed_at: list[int] = []  # the layers after whose hook r1's pages were back

        def watch(layer: int) -> None:
            if "r1" in worker.releases.snapshot():
                freed_at.append(layer)

        in_pass, release = _gate_passes(worker, at_layer=1, after_layer=watch)
        assert await worker.prefill([PrefillOrder(tiny_request("r1", prompt_len=40), NOWHERE)]) == [None]
        await asyncio.to_thread(in_pass.wait, ANSWER_S)
        assert in_pass.is_set() and worker.engine.blocks.num_free < free

        assert await asyncio.wait_for(worker.abort("r1", 0), ANSWER_S)  # answered while the pass is held
        assert "r1" not in worker.releases.snapshot()  # the engine thread holds the engine: nothing freed yet
        release.set()
        assert _cancelled_only(await channel.ended("r1"))  # no first token for an aborted request
        assert await _until(lambda: not worker._jobs)
        assert freed_at[0] == 1 and len(freed_at) == worker.engine.spec.num_layers - 1  # from the next layer on
        assert worker.engine.blocks.num_free == free and not worker.engine.held and worker._thread.error is None

    _run_with_prefill_worker(tiny_model_dir, scenario)


def test_a_prompt_aborted_while_its_pass_waits_for_the_device_has_its_pages_back_before_the_pass_ends(tiny_model_dir):
    request = tiny_request("r1", prompt_len=40)
    expected_first = hf_greedy_reference(tiny_model_dir, [request.engine_prompt], 1)[0][0]

    async def scenario(worker: PrefillWorker, channel: ChannelReader) -> None:
        free = worker.engine.blocks.num_free
        waiting, release = _hold_device_waits(worker)
        assert await worker.prefill([PrefillOrder(request, NOWHERE)]) == [None]
        await asyncio.to_thread(waiting.wait, ANSWER_S)
        assert waiting.is_set() and worker.engine.blocks.num_free < free

        assert await asyncio.wait_for(worker.abort("r1", 0), ANSWER_S)
        assert await _until(lambda: "r1" in worker.releases.snapshot())  # the pass is still held
        assert worker.engine.blocks.num_free == free and not worker.engine.held
        release.set()
        assert _cancelled_only(await channel.ended("r1"))
        assert await _until(lambda: not worker._jobs)
        assert worker.engine.blocks.num_free == free and worker._thread.error is None  # nothing freed twice

        # The same prompt again finds the aborted one's full blocks cached, and its first token is still right.
        again = tiny_request("r2", prompt_len=40)
        assert await worker.prefill([PrefillOrder(again, NOWHERE)]) == [None]
        first = await channel.first("r2")
        assert isinstance(first, TokenBatch) and first.tokens[0].token_id == expected_first
        block = worker.engine.runner.block_size
        assert first.cached_prompt_tokens == (40 - 1) // block * block  # all but the block of the last token
        await worker.abort("r2", 0)
        await channel.ended("r2")

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
