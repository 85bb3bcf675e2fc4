"""A worker's channel: one long-lived Ray stream from a worker to the router carrying the news of every request the
worker holds (a decode worker's tokens, a prefill worker's first tokens and transfer reports, either one's
failures), fanned out here to a queue per request attempt, and the news of its prefix cache (``CacheEvents``),
handed to the router's prefix index.

A Ray call per request that streams or stays open costs Ray work per request on both sides, and Ray serves an
actor's calls from one queue: an abort would wait behind it. Over one channel per worker a message carries a
whole step's news and each request's own calls are plain, short ones. A channel that breaks (the worker died or
its stream failed) fails every request reading from it at once, with ``WorkerDied``, so the router retries them
elsewhere.

The worker's end is an ``Outbox``; the router's a ``WorkerChannel``, opened on the worker's ``outputs`` stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ray.exceptions import RayActorError

from splitserve.cluster.messages import CacheEvents, ChannelItem, ChannelMessage, StreamFailure, TokenBatch

log = logging.getLogger(__name__)

_Key = tuple[str, int]  # (request id, attempt)
_Item = ChannelItem | BaseException


class WorkerDied(Exception):
    """A worker is gone (or its channel broke): the request is retried on other workers."""

    def __init__(self, worker_id: str):
        super().__init__(worker_id)
        self.worker_id = worker_id


class Outbox:
    """The worker's end: what its event loop posts goes out as one message per turn of the reader (more items per
    message when the router falls behind). Only touched on the worker's default event loop."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[ChannelMessage] = asyncio.Queue()

    def post(self, message: ChannelMessage) -> None:
        self._queue.put_nowait(message)

    async def messages(self) -> AsyncIterator[ChannelMessage]:
        while True:
            message = await self._queue.get()
            while not self._queue.empty():
                message.extend(self._queue.get_nowait())
            yield message


class Inbox:
    """One attempt's items, in the order the worker posted them; a failure posted for it is raised."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()

    async def next(self) -> ChannelItem:
        return _unwrap(await self._queue.get())

    def next_ready(self) -> ChannelItem | None:
        """The next item if one is waiting already, else None."""
        return None if self._queue.empty() else _unwrap(self._queue.get_nowait())

    def put(self, item: _Item) -> None:
        self._queue.put_nowait(item)


class WorkerChannel:
    def __init__(
        self,
        worker_id: str,
        actor: Any,
        on_broken: Callable[[], None],
        on_cache_events: Callable[[CacheEvents], None] = lambda events: None,
    ):
        self.worker_id = worker_id
        self._on_broken = on_broken  # called when the channel breaks by itself (not on close)
        self._on_cache_events = on_cache_events
        self._inboxes: dict[_Key, Inbox] = {}
        self._broken: WorkerDied | None = None
        self._pump = asyncio.create_task(self._read(actor.outputs.options(num_returns="streaming").remote()))

    @contextmanager
    def inbox(self, request_id: str, attempt: int) -> Iterator[Inbox]:
        """Open the attempt's inbox before making the call that starts it there: its first items may arrive before
        that call's reply. Items for an attempt nobody has open are dropped (its reader is gone)."""
        if self._broken is not None:
            raise self._broken
        key = (request_id, attempt)
        inbox = self._inboxes[key] = Inbox()
        try:
            yield inbox
        finally:
            if self._inboxes.get(key) is inbox:
                del self._inboxes[key]

    async def tokens(
        self, request_id: str, attempt: int, start: Callable[[], Awaitable[object]]
    ) -> AsyncIterator[TokenBatch]:
        """The attempt's token batches until it finishes; ``start`` makes the worker call that puts it in the batch.
        Batches waiting together are merged into one, so a reader that falls behind catches up in fewer messages."""
        with self.inbox(request_id, attempt) as inbox:
            await start()
            while True:
                batch = _batch(await inbox.next())
                while not batch.finished and (later := inbox.next_ready()) is not None:
                    batch.absorb(_batch(later))
                yield batch
                if batch.finished:
                    return

    def close(self) -> None:
        """The worker is being stopped or replaced: fail whoever still reads from it."""
        self._pump.cancel()
        self._fail_all(WorkerDied(self.worker_id))

    async def _read(self, stream: Any) -> None:
        try:
            async for ref in stream:
                for item in await ref:
                    self._dispatch(item)
            log.error("%s ended its channel", self.worker_id)
        except RayActorError:
            log.warning("%s: channel lost (the worker died)", self.worker_id)
        except Exception:
            log.exception("%s: channel failed", self.worker_id)
        self._fail_all(WorkerDied(self.worker_id))
        self._on_broken()

    def _dispatch(self, item: ChannelItem) -> None:
        if isinstance(item, CacheEvents):
            self._on_cache_events(item)
            return
        inbox = self._inboxes.get((item.request_id, item.attempt))
        if inbox is None:
            return  # its reader is gone (cancelled, failed over): nothing waits for it
        inbox.put(item.error if isinstance(item, StreamFailure) else item)

    def _fail_all(self, error: WorkerDied) -> None:
        if self._broken is None:
            self._broken = error
        for inbox in self._inboxes.values():
            inbox.put(error)


def _unwrap(item: _Item) -> ChannelItem:
    if isinstance(item, BaseException):
        raise item
    return item


def _batch(item: ChannelItem) -> TokenBatch:
    assert isinstance(item, TokenBatch), f"a token stream carries token batches, not {type(item).__name__}"
    return item
