"""The router's calls of one kind to one worker, sent as one Ray call per batch with one call in flight at a time.

Ray takes an actor's calls in through one queue, whatever their concurrency group, at a cost per call: a storm of
per-request calls keeps an abort waiting behind them. With one call in flight, what is submitted meanwhile waits
here and goes in the next call: under light load each item goes at once, alone; under a storm the worker's queue
holds at most one batch ahead of an abort.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Send = Callable[[list[Item]], Awaitable[Sequence[Any] | None]]


class CallBatcher(Generic[Item]):
    def __init__(self, send: Send[Item]):
        """``send`` makes the call with a batch and returns, per item in order, its answer or its error (an
        exception, which the item's caller gets raised); or just None: every item was taken, with no answer."""
        self._send = send
        self._waiting: list[tuple[Item, asyncio.Future[Any]]] = []
        self._flushing: asyncio.Task | None = None

    def submit(self, item: Item) -> asyncio.Future[Any]:
        """The item's answer, or its error (the call's own error for every item of a call that failed)."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, answer))
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())
        return answer

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._deliver(batch)
        finally:
            self._flushing = None

    async def _deliver(self, batch: list[tuple[Item, asyncio.Future[Any]]]) -> None:
        try:
            replies: Sequence[Any] = await self._send([item for item, _ in batch]) or [None] * len(batch)
        except Exception as err:
            replies = [err] * len(batch)
        for (_, answer), reply in zip(batch, replies, strict=True):
            if answer.done():  # its caller stopped waiting
                continue
            if isinstance(reply, BaseException):
                answer.set_exception(reply)
            else:
                answer.set_result(reply)
