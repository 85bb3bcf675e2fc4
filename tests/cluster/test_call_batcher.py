"""The router's batching of a kind of call to one worker: one call in flight, what comes meanwhile goes in the next
one, each item gets its own answer, and a call that fails fails each of its items."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.cluster.call_batcher import CallBatcher


class FakeWorker:
    """Stands in for a worker method taking a batch: records each call's items, answers when the test says so."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.replies: asyncio.Queue = asyncio.Queue()

    async def send(self, items: list[str]):
        self.calls.append(items)
        reply = await self.replies.get()
        if isinstance(reply, BaseException):
            raise reply
        return reply


def test_items_submitted_while_a_call_is_out_go_together_in_the_next():
    async def scenario():
        worker = FakeWorker()
        batcher = CallBatcher(worker.send)
        first = batcher.submit("a")
        await asyncio.sleep(0)  # the call for "a" is out
        later = [batcher.submit(x) for x in ("b", "c", "d")]
        await asyncio.sleep(0.01)
        assert worker.calls == [["a"]]  # one call in flight
        worker.replies.put_nowait(None)  # every item taken
        assert await asyncio.wait_for(first, 5) is None
        await asyncio.sleep(0.01)
        assert worker.calls == [["a"], ["b", "c", "d"]]
        refused = ValueError("c refused")
        worker.replies.put_nowait([None, refused, None])
        assert await asyncio.wait_for(later[0], 5) is None and await asyncio.wait_for(later[2], 5) is None
        with pytest.raises(ValueError, match="c refused"):
            await later[1]

    asyncio.run(scenario())


def test_a_failed_call_fails_each_of_its_items_and_a_caller_gone_is_skipped():
    async def scenario():
        worker = FakeWorker()
        batcher = CallBatcher(worker.send)
        kept, dropped = batcher.submit("a"), batcher.submit("b")
        dropped.cancel()  # its caller stopped waiting
        await asyncio.sleep(0.01)
        assert worker.calls == [["a", "b"]]
        worker.replies.put_nowait(ConnectionError("worker gone"))
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(kept, 5)
        after = batcher.submit("c")  # the batcher goes on after a failed call
        await asyncio.sleep(0.01)
        worker.replies.put_nowait(None)
        assert await asyncio.wait_for(after, 5) is None and worker.calls[-1] == ["c"]

    asyncio.run(scenario())
