"""The router's end of a decode worker's token channel: one Ray stream carrying every request's tokens, fanned out
here to a queue per request attempt.

A Ray streaming call per request costs a Ray message per token per request on both sides; with one channel per
worker a message carries a whole engine step. A channel that breaks (the worker died or its stream failed) fails
every request reading from it at once, with ``WorkerDied``, so the router retries them elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray.exceptions import RayActorError

from splitserve.cluster.messages import StreamFailure, TokenBatch

log = logging.getLogger(__name__)

_Key = tuple[str, int]  # (request id, attempt)
_Item = TokenBatch | BaseException


class WorkerDied(Exception):
    """A worker is gone (or its channel broke): the request is retried on other workers."""

    def __init__(self, worker_id: str):
        super().__init__(worker_id)
        self.worker_id = worker_id


class TokenChannel:
    def __init__(self, worker_id: str, actor: Any, on_broken: Callable[[], None]):
        self.worker_id = worker_id
        self._on_broken = on_broken  # called when the channel breaks by itself (not on close)
        self._queues: dict[_Key, asyncio.Queue[_Item]] = {}
        self._broken: WorkerDied | None = None
        self._pump = asyncio.create_task(self._read(actor.outputs.options(num_returns="streaming").remote()))

    async def tokens(
        self, request_id: str, attempt: int, start: Callable[[], Awaitable[object]]
    ) -> AsyncIterator[TokenBatch]:
        """The attempt's token batches until it finishes. ``start`` makes the worker call that puts it in the batch,
        once the queue is open: its first tokens may arrive before the call's reply. Batches waiting together are
        merged into one, so a reader that falls behind catches up in fewer messages."""
        if self._broken is not None:
            raise self._broken
        key = (request_id, attempt)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queues[key] = queue
        try:
            await start()
            while True:
                batch = _unwrap(await queue.get())
                while not batch.finished and not queue.empty():
                    batch.absorb(_unwrap(queue.get_nowait()))
                yield batch
                if batch.finished:
                    return
        finally:
            if self._queues.get(key) is queue:
                del self._queues[key]

    def close(self) -> None:
        """The worker is being stopped or replaced: fail whoever still reads from it."""
        self._pump.cancel()
        self._fail_all(WorkerDied(self.worker_id))

    async def _read(self, stream: Any) -> None:
        try:
            async for ref in stream:
                for item in await ref:
                    self._dispatch(item)
            log.error("%s ended its token channel", self.worker_id)
        except RayActorError:
            log.warning("%s: token channel lost (the worker died)", self.worker_id)
        except Exception:
            log.exception("%s: token channel failed", self.worker_id)
        self._fail_all(WorkerDied(self.worker_id))
        self._on_broken()

    def _dispatch(self, item: TokenBatch | StreamFailure) -> None:
        queue = self._queues.get((item.request_id, item.attempt))
        if queue is None:
            return  # its reader is gone (cancelled, failed over): nothing waits for it
        queue.put_nowait(item if isinstance(item, TokenBatch) else item.error)

    def _fail_all(self, error: WorkerDied) -> None:
        if self._broken is None:
            self._broken = error
        for queue in self._queues.values():
            queue.put_nowait(error)


def _unwrap(item: _Item) -> TokenBatch:
    if isinstance(item, BaseException):
        raise item
    return item
