"""The OpenAI-compatible HTTP API, through the openai package and raw HTTP, against real servers."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from splitserve.cluster.messages import ErrorCode, ServingError

from .conftest import MODEL, TOKEN
from .test_grpc_api import BAD_INPUTS

openai = pytest.importorskip("openai")  # not on the GPU image; the CPU suite always has it


def _post(
    url: str, body: dict | bytes, token: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    async def main():
        sent = {"Authorization": f"Bearer {token}"} if token else {}
        sent.update(headers or {})
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=sent) as response:
            return response.status, await response.json()

    return asyncio.run(main())


def test_openai_client_streams_completion_and_chat(harness):
    client = openai.OpenAI(base_url=f"{harness.http_url}/v1", api_key="unused")
    chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=7, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "hellohe"
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = client.completions.create(model=MODEL, prompt="hello", max_tokens=7)
    assert whole.choices[0].text == "hellohe" and whole.usage.completion_tokens == 7

    messages = [{"role": "user", "content": "hi"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert deltas[0].role == "assistant"
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content
    # The fake echoes the prompt: the chat template's BOS then "<|user|>..." shows the template was applied.
    assert chat.choices[0].message.content == "<|begin_of_text|><|use" and chat.usage.completion_tokens == 6
    assert [m.id for m in client.models.list()] == [MODEL]


def test_stream_usage_chunk_when_asked(harness):
    client = openai.OpenAI(base_url=f"{harness.http_url}/v1", api_key="unused")
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="ab", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 5


def test_the_session_key_is_the_header_else_session_id_else_user(harness):
    url = f"{harness.http_url}/v1/completions"
    body = {"prompt": "hi", "max_tokens": 2, "user": "alice"}
    sessions = []
    for extra, headers in (({}, {"x-session-id": "tab-3"}), ({"session_id": "conv-9"}, {}), ({}, {})):
        harness.cluster.requests.clear()
        status, reply = _post(url, {**body, **extra}, headers=headers)
        assert status == 200
        sessions.append(harness.cluster.requests[0].session_id)
    assert sessions == ["tab-3", "conv-9", "alice"]
    # The figures the router measured come back in the timing extension.
    cached = reply["usage"]["prompt_tokens"] - 1  # what the fake reports
    assert (reply["timing"]["cached_prompt_tokens"], reply["timing"]["kv_transfer_bytes"]) == (cached, 4096)
    client = openai.OpenAI(base_url=f"{harness.http_url}/v1", api_key="unused")
    harness.cluster.requests.clear()
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="bob")
    assert harness.cluster.requests[0].session_id == "bob"
    status, reply = _post(url, body, headers={"x-session-id": "s" * 257})
    assert status == 400 and "x-session-id" in reply["error"]["message"]


@pytest.mark.parametrize(("fields", "field"), BAD_INPUTS)
def test_bad_input_is_400_naming_the_field(harness, fields, field):
    body = {"prompt": "hi", **fields} if "prompt_token_ids" not in fields else fields
    status, answer = _post(f"{harness.http_url}/v1/completions", body)
    assert status == 400 and answer["error"]["message"].startswith(f"{field}:"), answer


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (json.dumps({"prompt": "x" * 5000}).encode(), "request"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ],
)
def test_malformed_bodies_are_400(harness, body, field):
    url = f"{harness.http_url}/v1/{'chat/' if b'messages' in str(body).encode() else ''}completions"
    status, answer = _post(url, body)
    assert status == 400 and answer["error"]["message"].startswith(f"{field}:"), answer


def test_cluster_errors_map_to_http_status(harness):
    for code, status in [(ErrorCode.RESOURCE_EXHAUSTED, 429), (ErrorCode.UNAVAILABLE, 503), (ErrorCode.INTERNAL, 500)]:
        harness.cluster.fail_next.append(ServingError(code, "boom"))
        got, answer = _post(f"{harness.http_url}/v1/completions", {"prompt": "hi", "stream": True})
        assert (got, answer["error"]["type"]) == (status, code.value)


def test_auth_and_per_client_limit(secured):
    url = f"{secured.http_url}/v1/completions"
    assert _post(url, {"prompt": "hi"})[0] == 401
    assert _post(url, {"prompt": "hi"}, token="nope")[0] == 401
    assert _post(url, {"prompt": "hi", "max_tokens": 2}, token=TOKEN)[0] == 200

    async def main():
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            body = {"prompt": "hello", "max_tokens": 20, "stream": True}
            async with session.post(url, json=body) as first:
                await first.content.readline()
                async with session.post(url, json={"prompt": "hi"}) as second:
                    return second.status, (await second.json())["error"]["message"]

    secured.cluster.hold.set()
    status, message = asyncio.run(main())
    assert status == 429 and "max_concurrent_per_client" in message


def test_client_disconnect_mid_stream_cancels_the_request(harness):
    async def main():
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "hello", "max_tokens": 20, "stream": True, "request_id": "gone"}
            response = await session.post(f"{harness.http_url}/v1/completions", json=body)
            first = await response.content.readline()
            await asyncio.to_thread(harness.cluster.started.wait, 5)
            response.close()  # drops the connection
            return first

    harness.cluster.hold.set()
    first = asyncio.run(main())
    assert json.loads(first.removeprefix(b"data: "))["choices"][0]["text"] == "he"
    assert harness.cluster.cancel_seen.wait(5)
    assert harness.cluster.cancelled == ["gone"]


def test_health_and_metrics(harness):
    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{harness.http_url}/health") as health:
                health_status = health.status
            await (await session.post(f"{harness.http_url}/v1/completions", json={"prompt": "hi"})).read()
            async with session.get(f"{harness.http_url}/metrics") as metrics:
                return health_status, await metrics.text()

    health_status, metrics = asyncio.run(main())
    assert health_status == 200
    assert 'splitserve_requests_total{api="http",status="ok"}' in metrics
    assert "splitserve_ttft_seconds_bucket" in metrics and "splitserve_requests_in_flight 0.0" in metrics
    assert 'splitserve_worker_kv_blocks_used{role="decode",worker_id="decode-0"} 28.0' in metrics  # the cluster's
