"""A FakeCluster with the real byte tokenizer, and real gRPC + HTTP servers on 127.0.0.1 run in a background loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from splitserve.cluster.messages import GenerateRequest, RequestTiming, ServingError, Token, TokenBatch
from splitserve.config import ModelConfig, ServerConfig, SplitserveConfig
from splitserve.engine.testing import build_byte_tokenizer
from tests.live_servers import LiveServers, serve_on_a_thread

MODEL = "fake-model"
MAX_MODEL_LEN = 128
VOCAB_SIZE = 300  # past the byte tokenizer's ids, as a padded embedding table is
TOKEN = "s3cret"


class FakeCluster:
    """Echoes the prompt's tokens back (cycled), two per batch, so outputs are deterministic and checkable."""

    def __init__(self, config: SplitserveConfig):
        self.config = config
        self.tokenizer = build_byte_tokenizer()
        self.max_model_len = MAX_MODEL_LEN
        self.vocab_size = VOCAB_SIZE
        self.hold = threading.Event()  # set = generation pauses after the first batch
        self.started = threading.Event()
        self.cancelled: list[str] = []
        self.cancel_seen = threading.Event()
        self.fail_next: list[ServingError] = []  # raised (one per request) before any token
        self.requests: list[GenerateRequest] = []

    def unavailable_reason(self) -> str | None:
        return None

    async def generate(self, request: GenerateRequest, timing: RequestTiming | None = None):
        timing = timing or RequestTiming(arrival=time.monotonic())
        self.requests.append(request)
        if self.fail_next:
            raise self.fail_next.pop(0)
        prompt = request.prompt_token_ids
        out = [prompt[i % len(prompt)] for i in range(request.params.max_tokens)]
        timing.prefill_worker, timing.decode_worker, timing.kv_transfer_s = "prefill-0", "decode-0", 0.001
        timing.cached_prompt_tokens, timing.kv_transfer_bytes = len(request.prompt_token_ids) - 1, 4096
        try:
            for start in range(0, len(out), 2):
                ids = out[start : start + 2]
                await asyncio.sleep(0)
                if start and self.hold.is_set():
                    self.started.set()
                    while self.hold.is_set():
                        await asyncio.sleep(0.01)
                now = time.monotonic()
                timing.first_token = timing.first_token or now
                done = start + 2 >= len(out)
                if done:
                    timing.finished = now
                tokens = [Token(t, self.tokenizer.decode([t]), -0.5 if request.params.logprobs else None) for t in ids]
                yield TokenBatch(request.request_id, tokens, done, "length" if done else None)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(request.request_id)
            self.cancel_seen.set()
            raise

    async def cancel(self, request_id: str) -> bool:
        return False

    async def status(self) -> dict[str, Any]:
        return {
            "mode": "disaggregated",
            "model": MODEL,
            "inflight": 0,
            "draining": False,
            "unavailable": None,
            "workers": self.worker_status(),
            "router": {
                "decode-0": {
                    "pending_tokens": 0.0,
                    "held_tokens": 40.0,
                    "occupancy": 0.2,
                    "requests": 1.0,
                    "healthy": 1.0,
                }
            },
        }

    def worker_status(self) -> list[dict[str, Any]]:
        return [
            {"worker_id": "prefill-0", "role": "prefill", "healthy": True, "kv_blocks_total": 64, "kv_blocks_free": 60},
            {"worker_id": "decode-0", "role": "decode", "healthy": True, "kv_blocks_total": 128, "kv_blocks_free": 100,
             "prefix_cache_lookup_blocks": 40, "prefix_cache_hit_blocks": 30},
        ]  # fmt: skip


def _start(server: ServerConfig) -> Iterator[LiveServers[FakeCluster]]:
    with serve_on_a_thread(FakeCluster(SplitserveConfig(model=ModelConfig(name=MODEL), server=server))) as live:
        yield live


@pytest.fixture(scope="module")
def harness() -> Iterator[LiveServers[FakeCluster]]:
    """Open servers (no token) with a roomy per-client limit."""
    yield from _start(ServerConfig(host="127.0.0.1", max_request_bytes=4096))


@pytest.fixture(scope="module")
def secured() -> Iterator[LiveServers[FakeCluster]]:
    """Servers that require TOKEN and allow one request in flight per client."""
    yield from _start(ServerConfig(host="127.0.0.1", auth_token=TOKEN, max_concurrent_per_client=1))


@pytest.fixture(autouse=True)
def _fresh_fake(request):
    """Tests share module-scoped servers; each starts with a clean fake."""
    for name in ("harness", "secured"):
        if name in request.fixturenames:
            cluster = request.getfixturevalue(name).cluster
            cluster.hold.clear()
            cluster.started.clear()
            cluster.cancel_seen.clear()
            cluster.cancelled.clear()
            cluster.fail_next.clear()
            cluster.requests.clear()
    yield
