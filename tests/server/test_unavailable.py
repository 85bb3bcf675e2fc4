"""A real cluster whose every worker died and cannot be restarted: both APIs refuse with UNAVAILABLE / 503 and the
reason, and every health answer says not serving and why."""

from __future__ import annotations

import asyncio
import shutil
import time

import aiohttp
import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.cluster.controller import Cluster
from splitserve.server.app import serve
from splitserve.server.gen import splitserve_pb2 as pb
from splitserve.server.gen import splitserve_pb2_grpc as pb_grpc
from tests.support import tiny_cluster_config

pytestmark = pytest.mark.slow
WAIT_S = 120.0


async def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.2)


def test_no_worker_able_to_serve_is_unavailable_with_the_reason(ray_local, tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = tiny_cluster_config(model_dir)

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        servers = await serve(cluster, config, 0, 0)
        try:
            # The checkpoint goes away, then every worker dies: each restart fails to load the model.
            shutil.rmtree(model_dir)
            for worker in list(cluster.workers.values()):
                ray.kill(worker.actor, no_restart=True)
            await _until(lambda: "restart failed" in (cluster.unavailable_reason() or ""), "the failed restarts")
            reason = cluster.unavailable_reason()
            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{servers.http_port}"
                async with http.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 4}) as answer:
                    completion = (answer.status, await answer.json())
                async with http.get(f"{base}/health") as answer:
                    health = (answer.status, await answer.json())
                async with http.get(f"{base}/v1/models") as answer:
                    models = answer.status
            async with grpc.aio.insecure_channel(f"127.0.0.1:{servers.grpc_port}") as channel:
                stub = pb_grpc.SplitserveStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.GenerateUnary(pb.GenerateRequest(prompt="hi", max_tokens=4))
                ours = await stub.Health(pb.HealthRequest())
                await _until_not_serving(channel)
            return reason, completion, health, models, refused.value, ours
        finally:
            await servers.stop(0)
            await cluster.shutdown()

    reason, completion, health, models, refused, ours = asyncio.run(scenario())
    assert reason is not None and "decode-0: its restart failed" in reason and "has no config.json" in reason
    assert completion[0] == 503 and completion[1]["error"]["message"] == reason
    assert health == (503, {"status": "unavailable", "reason": reason})
    assert models == 503
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and refused.details() == reason
    assert (ours.serving, ours.reason, ours.max_model_len) == (False, reason, 0)


async def _until_not_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + WAIT_S
    while (await health.Check(health_pb2.HealthCheckRequest())).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "the standard health service still says SERVING"
        await asyncio.sleep(0.2)
