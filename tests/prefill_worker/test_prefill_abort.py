"""A prefill worker's abort answers without waiting for the engine thread, and frees what the request holds as soon
as nothing can use it: a queued prompt at once, one in the pass in flight at that pass's end. An aborted request's
stream ends with nothing more in it, whoever aborted it (an error left there would be Ray's "unhandled error")."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

from splitserve.cluster.messages import GenerateRequest, PendingPages, TokenBatch
from splitserve.cluster.worker_options import options_for
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine import SamplingParams
from splitserve.kv_transfer import ReceiverEndpoint, TransferSpec
from splitserve.prefill_worker.worker import PrefillWorker
from tests.support import tiny_cluster_config

# A receiver nobody runs: these tests' transfers are never opened (their pages never come), so nothing dials it.
NOWHERE = ReceiverEndpoint("nobody", "localhost", 0, "cpu", address="127.0.0.1:1", backends=("grpc",))
ANSWER_S = 10  # generous for a loaded 2-core machine; an abort that waits for the gated pass never answers


def _request(request_id: str, prompt_len: int = 40) -> GenerateRequest:
    return GenerateRequest(request_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8, ignore_eos=True))


def _never_reserved() -> PendingPages:
    return PendingPages(asyncio.get_running_loop().create_future())


async def _drain(stream: AsyncIterator) -> list:
    return [item async for item in stream]


def _run_with_prefill_worker(model_dir, scenario: Callable[[PrefillWorker], Awaitable[None]]) -> None:
    config = tiny_cluster_config(model_dir)

    async def run() -> None:
        worker = PrefillWorker("prefill-0", options_for(config, config.prefill, str(model_dir)))
        try:
            await scenario(worker)
        finally:
            worker._thread.stop()

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
    async def scenario(worker: PrefillWorker) -> None:
        in_pass, release = _gate_passes(worker)
        running = asyncio.ensure_future(_drain(worker.prefill(_request("r-running"), NOWHERE, _never_reserved())))
        await asyncio.to_thread(in_pass.wait, ANSWER_S)
        assert in_pass.is_set()
        queued = asyncio.ensure_future(_drain(worker.prefill(_request("r-queued"), NOWHERE, _never_reserved())))
        while "r-queued" not in worker._jobs:  # it is queued behind the held pass
            await asyncio.sleep(0.01)

        assert await asyncio.wait_for(worker.abort("r-queued", 0), ANSWER_S)  # while the pass is still held
        assert await asyncio.wait_for(queued, ANSWER_S) == []  # its stream ends, with nothing in it
        assert not worker._queue and "r-queued" not in worker._jobs
        assert "r-queued" not in worker.releases.snapshot()  # it never held pages
        release.set()
        await worker.abort("r-running", 0)
        await asyncio.wait_for(running, ANSWER_S)

    _run_with_prefill_worker(tiny_model_dir, scenario)


def test_a_prompt_aborted_during_its_pass_frees_its_pages_when_that_pass_ends(tiny_model_dir):
    async def scenario(worker: PrefillWorker) -> None:
        free = worker.engine.blocks.num_free
        in_pass, release = _gate_passes(worker)
        stream = asyncio.ensure_future(_drain(worker.prefill(_request("r1"), NOWHERE, _never_reserved())))
        await asyncio.to_thread(in_pass.wait, ANSWER_S)
        assert in_pass.is_set() and worker.engine.blocks.num_free < free

        assert await asyncio.wait_for(worker.abort("r1", 0), ANSWER_S)  # answered while the pass is held
        assert "r1" not in worker.releases.snapshot()  # the pass still computes into its pages
        release.set()
        assert await asyncio.wait_for(stream, ANSWER_S) == []  # no first token for an aborted request
        for _ in range(100):  # the pass's end frees them; nothing else runs on the engine meanwhile
            if "r1" in worker.releases.snapshot():
                break
            await asyncio.sleep(0.05)
        assert "r1" in worker.releases.snapshot()
        assert worker.engine.blocks.num_free == free and not worker.engine.held and not worker._jobs

    _run_with_prefill_worker(tiny_model_dir, scenario)


def test_a_transfer_the_receiver_aborted_ends_the_stream_quietly(tiny_model_dir):
    """The decode worker's abort reaches the sender before the router's reaches the prefill worker: the stream,
    which the router no longer reads, must end without an error, and the pages still come back."""
    config = tiny_cluster_config(tiny_model_dir)

    async def scenario(worker: PrefillWorker) -> None:
        decode = DecodeWorker("decode-0", options_for(config, config.decode, str(tiny_model_dir)))
        try:
            await decode.ready()
            free = worker.engine.blocks.num_free
            request = _request("r1")
            runner = decode.engine.runner
            dst = decode.engine.blocks.allocate(decode.engine.blocks.blocks_for(len(request.engine_prompt)))
            spec = TransferSpec(
                "r1", runner.spec.num_layers, len(request.engine_prompt), dst, runner.page_shape, "float32"
            )
            decode.receiver.expect(spec)
            pages: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
            stream = worker.prefill(request, decode.receiver.endpoint, PendingPages(pages))
            first = await asyncio.wait_for(stream.__anext__(), ANSWER_S)
            assert isinstance(first, TokenBatch) and not first.finished
            decode.receiver.abort("r1")  # before the pages reach the prefill worker: its transfer meets the abort
            pages.set_result(dst)
            assert await asyncio.wait_for(_drain(stream), ANSWER_S) == []
            for _ in range(100):
                if "r1" in worker.releases.snapshot():
                    break
                await asyncio.sleep(0.05)
            assert worker.engine.blocks.num_free == free and not worker._jobs
        finally:
            decode._thread.stop()
            decode.receiver.close()

    _run_with_prefill_worker(tiny_model_dir, scenario)
