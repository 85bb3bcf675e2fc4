"""An abort that overtakes the call it cancels (Ray does not keep an async actor's call order) must still win:
the late call is refused and nothing is left held. The workers run in-process here, as plain objects, so the two
orders can be forced exactly."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

from splitserve.cluster.messages import ErrorCode, PagesReady, PrefillOrder, ServingError, StreamFailure, TokenBatch
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.kv_transfer import ReceiverEndpoint
from splitserve.worker_common import AbortedAttempts, RequestTimes
from tests.in_process import decode_worker, next_failure, prefill_worker, tiny_request


def test_aborted_attempts_are_claimed_once_and_bounded():
    aborted = AbortedAttempts(capacity=2)
    aborted.add("a", 0)
    assert not aborted.claim("a", 1)  # another attempt of the same request is not refused
    assert aborted.claim("a", 0) and not aborted.claim("a", 0)
    for i in range(3):
        aborted.add("b", i)
    assert not aborted.claim("b", 0) and aborted.claim("b", 2)  # the oldest was forgotten


def test_request_times_keep_the_latest_time_per_request_and_are_bounded():
    log = RequestTimes(capacity=2)
    log.record("a")
    first = log.snapshot()["a"]
    log.record("b")
    log.record("a")  # a retry freed again: the later time counts, and "a" becomes the newest
    log.record("c")
    times = log.snapshot()
    assert set(times) == {"a", "c"} and times["a"] >= first


def test_decode_worker_refuses_a_reservation_whose_abort_came_first(tiny_model_dir):
    async def scenario():
        async with decode_worker(tiny_model_dir) as worker:
            free = worker.engine.blocks.num_free
            before = time.time()
            assert not await worker.abort("r1", 0)  # nothing here yet: remembered
            assert before <= (await worker.abort_times())["r1"] <= time.time()  # its arrival is logged all the same
            [refused] = await worker.reserve([tiny_request("r1", attempt=0)])
            assert isinstance(refused, ServingError) and refused.code == ErrorCode.CANCELLED
            stats = await worker.stats()
            assert stats.kv_blocks_free == free and stats.extra["expected"] == 0 and stats.extra["held"] == 0
            # The retry (attempt 1) is served; an abort in the usual order frees it.
            [pages] = await worker.reserve([tiny_request("r1", attempt=1)])
            assert isinstance(pages, PagesReady) and pages.block_ids
            assert await worker.abort("r1", 1)
            assert (await worker.stats()).kv_blocks_free == free

    asyncio.run(scenario())


def test_prefill_worker_refuses_a_prompt_whose_abort_came_first(tiny_model_dir):
    async def scenario():
        async with prefill_worker(tiny_model_dir) as worker:
            assert not await worker.abort("r1", 0)
            assert "r1" in await worker.abort_times()
            endpoint = ReceiverEndpoint("nobody", "localhost", 0, "cpu", backends=("grpc",))
            # Refused without a word: the router, which aborted it, waits for nothing from it.
            assert await worker.prefill([PrefillOrder(tiny_request("r1", attempt=0), endpoint)]) == [None]
            await worker.pages([PagesReady("r1", 0, [0])])  # the pages the router sends once it is taken: ignored
            await asyncio.sleep(0.2)  # time for anything it would post, or for a pass that ran it
            stats = await worker.stats()
            assert stats.extra["jobs"] == 0 and stats.queued_requests == 0 and not worker.releases.snapshot()
            assert worker._outbox._queue.empty()  # nothing posted for it
            # The retry (attempt 1) is taken.
            assert await worker.prefill([PrefillOrder(tiny_request("r1", attempt=1), endpoint)]) == [None]
            assert worker._jobs["r1"].request.attempt == 1
            assert await worker.abort("r1", 1)

    asyncio.run(scenario())


def test_decode_worker_abort_on_the_control_loop_ends_a_stream_of_the_default_loop(tiny_model_dir):
    """Ray runs aborts on the control concurrency group's own event loop thread, while the token channel lives on
    the default loop: the request's stream must still end on the channel with CANCELLED, and every page come back."""

    async def scenario(worker: DecodeWorker, control: asyncio.AbstractEventLoop):
        free = worker.engine.blocks.num_free
        channel = worker.outputs()
        long = tiny_request("r1", max_tokens=100)
        await worker.start_local(long)
        first = await channel.__anext__()
        assert first and all(isinstance(item, TokenBatch) and item.attempt == 0 for item in first)
        produced = sum(len(item.tokens) for item in first)
        aborted = asyncio.run_coroutine_threadsafe(worker.abort("r1", 0), control)
        ended: StreamFailure | None = None
        while ended is None:
            for item in await channel.__anext__():
                if isinstance(item, StreamFailure):
                    ended = item
                else:
                    produced += len(item.tokens)
        assert (ended.request_id, ended.attempt) == ("r1", 0) and ended.error.code == ErrorCode.CANCELLED
        assert produced < 100
        assert await asyncio.wait_for(asyncio.wrap_future(aborted), 10)
        stats = await worker.stats()
        assert stats.kv_blocks_free == free and stats.extra["streams"] == 0

    _run_beside_a_control_loop(tiny_model_dir, scenario)


def test_an_abort_overtaken_by_the_start_it_cancels_still_ends_the_stream(tiny_model_dir):
    """The abort ends the stream first (none is open yet: the request's start is still on its way), the start then
    opens it and puts the request in the batch, and only then does the abort drop it from the engine: the stream
    must end too, not stay open with nothing left to finish it (the chaos suite's abort storm found one left so)."""

    async def scenario(worker: DecodeWorker, control: asyncio.AbstractEventLoop):
        free = worker.engine.blocks.num_free
        channel = worker.outputs()
        gate: Future[None] = Future()
        worker.receiver.unwritten = lambda request_id: gate  # fake: the abort waits here until the start is in
        aborted = asyncio.run_coroutine_threadsafe(worker.abort("r1", 0), control)
        await asyncio.sleep(0.2)  # its first end of the stream has run, with no stream open
        long = tiny_request("r1", max_tokens=1000)
        await worker.start_local(long)
        gate.set_result(None)
        assert await asyncio.wait_for(asyncio.wrap_future(aborted), 10)

        ended = await next_failure(channel, "r1")
        assert (ended.request_id, ended.attempt, ended.error.code) == ("r1", 0, ErrorCode.CANCELLED)
        stats = await worker.stats()
        assert stats.kv_blocks_free == free and stats.extra["streams"] == 0

    _run_beside_a_control_loop(tiny_model_dir, scenario)


def test_a_reservation_made_while_its_abort_runs_is_freed_by_that_abort(tiny_model_dir):
    """The reservation lands right after the abort told the receiver, before the abort looks at what it waits for:
    the abort must still free it, not wait for a transfer that nobody will send (found by the chaos suite: one such
    reservation stayed held, with its expectation, forever)."""

    async def scenario(worker: DecodeWorker, control: asyncio.AbstractEventLoop):
        free = worker.engine.blocks.num_free
        real_abort = worker.receiver.abort
        reserved: list[PagesReady | ServingError] = []

        def abort_then_reserve(request_id: str, *args) -> bool:  # fake: forces the interleaving
            told = real_abort(request_id, *args)
            if not reserved:  # the abort's first word to the receiver: the reservation comes in right after it
                first_try = [tiny_request("r1", attempt=0)]
                helper = threading.Thread(target=lambda: reserved.extend(asyncio.run(worker.reserve(first_try))))
                helper.start()
                helper.join()
            return told

        worker.receiver.abort = abort_then_reserve
        aborted = asyncio.run_coroutine_threadsafe(worker.abort("r1", 0), control)
        assert await asyncio.wait_for(asyncio.wrap_future(aborted), 10)
        assert reserved and isinstance(reserved[0], PagesReady) and reserved[0].block_ids  # made, and then freed
        stats = await worker.stats()
        assert stats.kv_blocks_free == free
        assert (stats.extra["expected"], stats.extra["held"], stats.extra["pending_transfers"]) == (0, 0, 0)

    _run_beside_a_control_loop(tiny_model_dir, scenario)


def _run_beside_a_control_loop(model_dir, scenario) -> None:
    """Run ``scenario(worker, control)`` on an in-process decode worker, with a second event loop on its own thread
    standing in for the control concurrency group's, where Ray runs aborts."""
    control = asyncio.new_event_loop()
    threading.Thread(target=control.run_forever, name="control-group", daemon=True).start()

    async def run() -> None:
        async with decode_worker(model_dir) as worker:
            await scenario(worker, control)

    try:
        asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        control.call_soon_threadsafe(control.stop)
