"""A real cluster (Ray actors on CPU, the tiny model) behind real gRPC/HTTP servers on 127.0.0.1, run on a
background event loop so tests drive it through the blocking SDK and the CLI like a user would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from splitserve.cluster.controller import Cluster
from tests.live_servers import LiveServers, serve_on_a_thread
from tests.ops.ray_head import RayHead, start_ray_head
from tests.support import tiny_cluster_config


@pytest.fixture(scope="module")
def live(ray_local, tiny_model_dir) -> Iterator[LiveServers[Cluster]]:
    """A 1 prefill + 1 decode cluster shared by a module (a worker takes ~15 s to start on 2 cores); stopped at
    teardown unless a test stopped it."""
    cluster = Cluster(tiny_cluster_config(tiny_model_dir))
    with serve_on_a_thread(cluster, setup=cluster.start, teardown=cluster.shutdown) as servers:
        yield servers


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """A Ray head of the test's own; stopped at teardown unless the test stopped it."""
    yield from start_ray_head()
