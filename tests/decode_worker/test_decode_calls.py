"""A decode worker's calls from the router, taken in batches: each reservation of a call is answered on its own,
``start`` answers at once (the attempt's tokens or its failure follow on the token channel), and an abort frees a
reservation during the step in flight while a request in the batch is dropped once that step is done with its pages.
The worker runs in-process here, as a plain object, so a step can be held in its wait for the device."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

from splitserve.cluster.messages import DecodeOrder, ErrorCode, PagesReady, ServingError, Token
from splitserve.decode_worker.worker import DecodeWorker
from tests.in_process import ANSWER_S, decode_worker, next_failure, tiny_request


def _run_with_decode_worker(model_dir, scenario: Callable[[DecodeWorker], Awaitable[None]]) -> None:
    async def run() -> None:
        async with decode_worker(model_dir) as worker:
            await scenario(worker)

    asyncio.run(asyncio.wait_for(run(), 120))


def test_each_reservation_of_a_call_is_answered_on_its_own(tiny_model_dir):
    async def scenario(worker: DecodeWorker) -> None:
        free = worker.engine.blocks.num_free
        too_long = tiny_request("r-long", prompt_len=worker.engine.max_model_len + 1)
        answers = await worker.reserve([tiny_request("r1"), tiny_request("r2"), tiny_request("r1"), too_long])
        assert all(isinstance(pages, PagesReady) and pages.block_ids for pages in answers[:2])
        assert isinstance(answers[2], ServingError) and answers[2].code == ErrorCode.INVALID_ARGUMENT
        assert isinstance(answers[3], ServingError) and answers[3].code == ErrorCode.INVALID_ARGUMENT
        assert set(worker._expected) == {"r1", "r2"}
        for rid in ("r1", "r2"):
            assert await worker.abort(rid, 0)
        assert worker.engine.blocks.num_free == free and not worker._expected and not worker.engine.held

    _run_with_decode_worker(tiny_model_dir, scenario)


def test_start_answers_at_once_and_a_failure_comes_on_the_token_channel(tiny_model_dir):
    async def scenario(worker: DecodeWorker) -> None:
        free = worker.engine.blocks.num_free
        channel = worker.outputs()
        token = Token(7, "")
        # No reservation for it: the call still answers, and the failure comes on the channel for that attempt.
        assert await worker.start([DecodeOrder("r-none", 3, token)]) is None
        ended = await next_failure(channel, "r-none")
        assert (ended.attempt, ended.error.code) == (3, ErrorCode.INTERNAL) and "no reservation" in ended.error.message

        # Reserved, and its KV still on the way: start answers without waiting for it.
        [pages] = await worker.reserve([tiny_request("r1")])
        assert isinstance(pages, PagesReady)
        assert await asyncio.wait_for(worker.start([DecodeOrder("r1", 0, token)]), ANSWER_S) is None
        assert "r1" in worker._expected and not worker._expected["r1"].done()
        worker.receiver.abort("r1")  # the transfer fails (the sender gave up): the attempt ends there
        ended = await next_failure(channel, "r1")
        assert ended.attempt == 0 and ended.error.code == ErrorCode.UNAVAILABLE
        assert "KV transfer failed" in ended.error.message
        for _ in range(100):  # _drop_failed frees the reservation on the engine's side
            if worker.engine.blocks.num_free == free:
                break
            await asyncio.sleep(0.05)
        assert worker.engine.blocks.num_free == free and not worker._expected and not worker._starting

    _run_with_decode_worker(tiny_model_dir, scenario)


def _hold_the_next_device_wait(worker: DecodeWorker) -> tuple[threading.Event, threading.Event]:
    """Hold the next step in its wait for the device (as a GPU step is held until its tokens are read back) until
    ``release`` is set; ``in_wait`` is set once a step is held there. Steps after it pass."""
    in_wait, release = threading.Event(), threading.Event()
    real_wait = worker.engine.device_wait
    assert real_wait is not None

    def held(blocking: Callable[[], None]) -> None:
        def wait() -> None:
            if not in_wait.is_set():
                in_wait.set()
                release.wait(ANSWER_S)
            blocking()

        real_wait(wait)

    worker.engine.device_wait = held  # fake: gates the device wait, which the engine thread still runs
    return in_wait, release


def test_an_abort_frees_a_reservation_during_a_step_and_a_request_in_the_batch_after_it(tiny_model_dir):
    async def scenario(worker: DecodeWorker) -> None:
        free = worker.engine.blocks.num_free
        channel = worker.outputs()
        in_wait, release = _hold_the_next_device_wait(worker)
        await worker.start_local(tiny_request("r-batch", max_tokens=1000))
        await asyncio.to_thread(in_wait.wait, ANSWER_S)
        assert in_wait.is_set()  # a step of r-batch is held in its device wait

        [pages] = await worker.reserve([tiny_request("r-reserved")])  # during the step: free pages only
        assert isinstance(pages, PagesReady)
        assert await asyncio.wait_for(worker.abort("r-reserved", 0), ANSWER_S)  # while the step is still held
        assert "r-reserved" in worker.releases.snapshot() and not release.is_set()

        dropping = asyncio.ensure_future(worker.abort("r-batch", 0))
        await asyncio.sleep(0.2)  # time for the abort to reach the engine, which must not free r-batch's pages yet
        assert not dropping.done() and "r-batch" not in worker.releases.snapshot()
        release.set()
        assert await asyncio.wait_for(dropping, ANSWER_S)
        assert "r-batch" in worker.releases.snapshot()
        ended = await next_failure(channel, "r-batch")
        assert ended.error.code == ErrorCode.CANCELLED
        stats = await worker.stats()
        assert stats.kv_blocks_free == free and stats.extra["streams"] == 0 and stats.extra["expected"] == 0

    _run_with_decode_worker(tiny_model_dir, scenario)
