"""The router's end of a worker's channel, against a fake worker stream: routing by attempt, merging of token
batches that wait together, a prefill worker's first token and transfer report, an attempt's failure, and a broken
channel failing every reader."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayActorError

from splitserve.cluster.channel import WorkerChannel, WorkerDied
from splitserve.cluster.messages import ErrorCode, ServingError, StreamFailure, Token, TokenBatch, TransferReport


class FakeWorkerStream:
    """Stands in for ``actor.outputs.options(num_returns="streaming").remote()``: messages the test sends, each
    wrapped like a Ray object ref (an awaitable)."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()

    def options(self, **_: object) -> FakeWorkerStream:
        return self

    def remote(self) -> FakeWorkerStream:
        return self

    def __aiter__(self) -> FakeWorkerStream:
        return self

    async def __anext__(self):
        item = await self.messages.get()
        if isinstance(item, BaseException):
            raise item

        async def ref():
            return item

        return ref()


class FakeActor:
    def __init__(self) -> None:
        self.outputs = FakeWorkerStream()


def batch(request_id: str, attempt: int, *tokens: int, finished: bool = False) -> TokenBatch:
    return TokenBatch(request_id, [Token(t, str(t)) for t in tokens], finished, "length" if finished else None, attempt)


async def _collect(stream) -> list[list[int]]:
    return [[t.token_id for t in b.tokens] async for b in stream]


def test_tokens_reach_their_attempt_only_and_waiting_batches_merge():
    async def scenario():
        actor, broken = FakeActor(), []
        channel = WorkerChannel("decode-0", actor, on_broken=lambda: broken.append(True))
        started = asyncio.Event()

        async def start():
            started.set()

        reader = asyncio.create_task(_collect(channel.tokens("r1", 1, start)))
        await started.wait()
        send = actor.outputs.messages.put_nowait
        send([batch("r1", 0, 99), batch("r1", 1, 1), batch("other", 0, 7)])  # attempt 0 is an older try: dropped
        send([batch("r1", 1, 2)])
        send([batch("r1", 1, 3, finished=True)])
        # All three arrived before the reader ran again: one merged batch, in order, without the older try's token.
        assert await asyncio.wait_for(reader, 5) == [[1, 2, 3]]
        channel.close()
        assert not broken  # closing is not breaking

    asyncio.run(scenario())


def test_an_inbox_gets_its_attempts_items_in_order_and_nothing_once_closed():
    async def scenario():
        actor = FakeActor()
        channel = WorkerChannel("prefill-0", actor, on_broken=lambda: None)
        report = TransferReport("r1", 2, 0.01, 0.0, 4096, "grpc")
        with channel.inbox("r1", 2) as inbox:
            actor.outputs.messages.put_nowait([batch("r1", 1, 5), batch("r1", 2, 7), report])
            first = await asyncio.wait_for(inbox.next(), 5)
            assert isinstance(first, TokenBatch) and [t.token_id for t in first.tokens] == [7]
            assert await asyncio.wait_for(inbox.next(), 5) is report
        assert ("r1", 2) not in channel._inboxes  # closed: a late item for it is dropped
        actor.outputs.messages.put_nowait([StreamFailure("r1", 2, ServingError(ErrorCode.CANCELLED, "r1 aborted"))])
        await asyncio.sleep(0.05)
        assert not channel._broken
        channel.close()

    asyncio.run(scenario())


def test_a_stream_failure_raises_its_error_for_that_attempt():
    async def scenario():
        actor = FakeActor()
        channel = WorkerChannel("decode-0", actor, on_broken=lambda: None)

        async def start():
            error = ServingError(ErrorCode.CANCELLED, "r1 aborted")
            actor.outputs.messages.put_nowait([batch("r1", 0, 1), StreamFailure("r1", 0, error)])

        with pytest.raises(ServingError) as failed:
            await asyncio.wait_for(_collect(channel.tokens("r1", 0, start)), 5)
        assert failed.value.code == ErrorCode.CANCELLED
        channel.close()

    asyncio.run(scenario())


def test_a_broken_channel_fails_every_reader_and_asks_for_a_replacement():
    async def scenario():
        actor, broken = FakeActor(), asyncio.Event()
        channel = WorkerChannel("decode-0", actor, on_broken=broken.set)

        async def start():
            pass

        readers = [asyncio.create_task(_collect(channel.tokens(f"r{i}", 0, start))) for i in range(3)]
        await asyncio.sleep(0.05)
        actor.outputs.messages.put_nowait(RayActorError())
        await asyncio.wait_for(broken.wait(), 5)
        for reader in readers:
            with pytest.raises(WorkerDied):
                await asyncio.wait_for(reader, 5)
        with pytest.raises(WorkerDied):  # a reader that comes later fails at once, never waits
            await asyncio.wait_for(_collect(channel.tokens("late", 0, start)), 5)

    asyncio.run(scenario())
