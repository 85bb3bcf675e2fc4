"""A real cluster (Ray actors on CPU, the tiny model) behind real gRPC/HTTP servers on 127.0.0.1, run on a
background event loop so tests drive it through the blocking SDK and the CLI like a user would."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from splitserve.cluster.controller import Cluster
from splitserve.server.app import Servers, serve
from tests.ops.ray_head import RayHead, start_ray_head
from tests.support import tiny_cluster_config

_T = TypeVar("_T")


tiny_config = tiny_cluster_config


@dataclass
class Live:
    cluster: Cluster
    servers: Servers
    loop: asyncio.AbstractEventLoop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.servers.grpc_port}"

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 120) -> _T:
        """Run ``coro`` on the servers' loop and wait for it (bounded)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="module")
def live(ray_local, tiny_model_dir) -> Iterator[Live]:
    """A 1 prefill + 1 decode cluster shared by a module (a worker takes ~15 s to start on 2 cores); stopped at
    teardown unless a test stopped it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cluster = Cluster(tiny_config(tiny_model_dir))

    async def start() -> Servers:
        await cluster.start()
        return await serve(cluster, cluster.config)

    harness = Live(cluster, asyncio.run_coroutine_threadsafe(start(), loop).result(120), loop)
    try:
        yield harness
    finally:
        harness.call(cluster.shutdown())
        harness.call(harness.servers.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """A Ray head of the test's own; stopped at teardown unless the test stopped it."""
    yield from start_ray_head()
