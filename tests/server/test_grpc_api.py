"""The gRPC API through the SDK, against real servers over a FakeCluster."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from splitserve.client import (
    AsyncClient,
    Client,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from splitserve.cluster.messages import ErrorCode, ServingError

from .conftest import MAX_MODEL_LEN, MODEL, TOKEN

BAD_INPUTS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * MAX_MODEL_LEN}, "prompt"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "model": "gpt-9"}, "model"),
    ({"prompt_token_ids": [1, 10_000]}, "prompt_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [-3]}, "stop_token_ids"),
]


def test_stream_equals_unary_and_last_event_has_usage_and_timing(harness):
    with Client(harness.grpc_address) as client:
        events = list(client.generate("hello", max_tokens=7, logprobs=True))
        result = client.generate("hello", max_tokens=7, logprobs=True, stream=False)
    assert "".join(e.text for e in events) == result.text == "hellohe"
    assert [t for e in events for t in e.token_ids] == result.token_ids
    assert [e.finish_reason for e in events] == [None, None, None, "length"]
    assert result.logprobs == [-0.5] * 7
    last = events[-1]
    assert last.usage is not None and last.usage.prompt_tokens == 5 and last.usage.completion_tokens == 7
    assert last.timing is not None and last.timing.decode_worker == "decode-0" and last.timing.e2e_ms > 0
    assert result.usage == last.usage


def test_session_id_reaches_the_cluster_and_the_cache_figures_come_back(harness):
    with Client(harness.grpc_address) as client:
        result = client.generate(prompt_token_ids=[71, 72, 73], max_tokens=3, session_id="chat-7", stream=False)
        plain = client.generate(prompt_token_ids=[71, 72, 73], max_tokens=3, stream=False)
    assert [r.session_id for r in harness.cluster.requests] == ["chat-7", None]
    assert result.timing is not None and plain.timing is not None
    assert (result.timing.cached_prompt_tokens, result.timing.kv_transfer_bytes) == (2, 4096)
    with Client(harness.grpc_address) as client, pytest.raises(InvalidArgument, match="session_id"):
        client.generate("hi", session_id="s" * 257, stream=False)


def test_token_ids_prompt_and_request_id_round_trip(harness):
    with Client(harness.grpc_address) as client:
        result = client.generate(prompt_token_ids=[71, 72], max_tokens=3, request_id="my-req", stream=False)
    assert (result.request_id, result.text, result.finish_reason) == ("my-req", "hih", "length")
    assert harness.cluster.requests[-1].request_id == "my-req"


@pytest.mark.parametrize(("fields", "field"), BAD_INPUTS)
def test_bad_input_is_invalid_argument_naming_the_field(harness, fields, field):
    fields = dict(fields)
    prompt = fields.pop("prompt", None)
    with Client(harness.grpc_address) as client, pytest.raises(InvalidArgument) as err:
        client.generate(prompt, stream=False, **fields)
    assert err.value.message.startswith(f"{field}:"), err.value.message
    assert not harness.cluster.requests


def test_oversized_request_is_invalid_argument(harness):
    with Client(harness.grpc_address) as client, pytest.raises(InvalidArgument, match="max_request_bytes"):
        client.generate("x" * 5000, stream=False)


def test_unavailable_is_retried_before_the_first_token(harness):
    harness.cluster.fail_next.extend([ServingError(ErrorCode.UNAVAILABLE, "draining")] * 2)
    with Client(harness.grpc_address, retries=3) as client:
        assert client.generate("ab", max_tokens=2, stream=False).text == "ab"
    assert len(harness.cluster.requests) == 3


def test_errors_map_to_typed_exceptions_without_retrying_others(harness):
    harness.cluster.fail_next.append(ServingError(ErrorCode.RESOURCE_EXHAUSTED, "queue full"))
    with Client(harness.grpc_address, retries=0) as client:
        with pytest.raises(ResourceExhausted, match="queue full"):
            list(client.generate("ab"))
        harness.cluster.fail_next.append(ServingError(ErrorCode.UNAVAILABLE, "no workers"))
        with pytest.raises(Unavailable):
            client.generate("ab", stream=False)
    assert len(harness.cluster.requests) == 2


def test_closing_the_stream_cancels_the_request_in_the_cluster(harness):
    harness.cluster.hold.set()
    with Client(harness.grpc_address) as client:
        stream = client.generate("hello", max_tokens=20, request_id="to-close")
        assert next(stream).text == "he"
        assert harness.cluster.started.wait(5)
        stream.close()
        assert harness.cluster.cancel_seen.wait(5)
    assert harness.cluster.cancelled == ["to-close"]


def test_async_client_break_cancels_and_health_and_status(harness):
    async def main():
        async with AsyncClient(harness.grpc_address) as client:
            health = await client.health()
            status = await client.cluster_status()
            result = await client.generate("hey", max_tokens=4, stream=False)
            harness.cluster.hold.set()
            async with aclosing(client.generate("hello", max_tokens=20, request_id="async-break")) as stream:
                async for _event in stream:
                    break
            await asyncio.to_thread(harness.cluster.cancel_seen.wait, 5)
            return health, status, result

    health, status, result = asyncio.run(main())
    assert (health.serving, health.model, health.max_model_len) == (True, MODEL, MAX_MODEL_LEN)
    assert status["kv_blocks_total"] == "192" and status["workers"][1]["kv_blocks_free"] == "100"
    assert status["workers"][1]["prefix_cache_hit_blocks"] == "30"
    assert status["router_loads"][0]["held_tokens"] == 40.0
    assert result.text == "heyh"
    assert harness.cluster.cancelled == ["async-break"]


def test_auth_is_required_except_for_standard_health(secured):
    with Client(secured.grpc_address) as anonymous, pytest.raises(Unauthenticated):
        anonymous.generate("hi", stream=False)
    with Client(secured.grpc_address, token="wrong") as wrong, pytest.raises(Unauthenticated):
        list(wrong.generate("hi"))
    with Client(secured.grpc_address, token=TOKEN) as client:
        assert client.generate("hi", max_tokens=2, stream=False).text == "hi"
    with grpc.insecure_channel(secured.grpc_address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_reflection_lists_the_service(harness):
    with grpc.insecure_channel(harness.grpc_address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(reflect.ServerReflectionInfo(iter([request])))
    assert "splitserve.v1.Splitserve" in {s.name for s in answer.list_services_response.service}


def test_per_client_concurrency_limit(secured):
    secured.cluster.hold.set()
    with Client(secured.grpc_address, token=TOKEN, retries=0) as client:
        first = client.generate("hello", max_tokens=20)
        next(first)
        with pytest.raises(ResourceExhausted, match="max_concurrent_per_client"):
            client.generate("hi", max_tokens=2, stream=False)
        secured.cluster.hold.clear()
        assert list(first)[-1].finish_reason == "length"
        assert client.generate("hi", max_tokens=2, stream=False).text == "hi"
