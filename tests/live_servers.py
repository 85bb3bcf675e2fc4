"""Real gRPC and HTTP servers on 127.0.0.1 over a cluster (a real one or a fake), run on an event loop of their own
thread, so tests drive them through the blocking SDK, HTTP or the CLI as a user would."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from splitserve.server.app import Servers, serve
from splitserve.server.frontend import ServingCluster

_C = TypeVar("_C", bound=ServingCluster)
_T = TypeVar("_T")

START_S = 120.0  # bounds a real cluster's start too: its workers load the model before the servers open


@dataclass
class LiveServers(Generic[_C]):
    """What a test drives: the servers' addresses, and their loop to run the cluster's coroutines on."""

    cluster: _C
    servers: Servers
    loop: asyncio.AbstractEventLoop

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.servers.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.servers.http_port}"

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 120) -> _T:
        """Run ``coro`` on the servers' loop and wait for it (bounded)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def serve_on_a_thread(
    cluster: _C,
    setup: Callable[[], Awaitable[None]] | None = None,
    teardown: Callable[[], Awaitable[None]] | None = None,
) -> Iterator[LiveServers[_C]]:
    """Servers over ``cluster`` on free ports, started after ``setup`` (a real cluster's start) on their own loop;
    on exit ``teardown`` runs there, then the servers and the loop stop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Servers:
        if setup is not None:
            await setup()
        return await serve(cluster, cluster.config, 0, 0)

    live = LiveServers(cluster, asyncio.run_coroutine_threadsafe(start(), loop).result(START_S), loop)
    try:
        yield live
    finally:
        if teardown is not None:
            live.call(teardown())
        live.call(live.servers.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
