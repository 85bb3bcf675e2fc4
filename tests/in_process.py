"""Workers run in-process, as plain objects on the test's own loop (no Ray actor), so a test can hold a step in its
wait for the device or force the order of two calls exactly; and the requests such tests send them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from splitserve.cluster.messages import ChannelMessage, GenerateRequest, StreamFailure
from splitserve.cluster.worker_options import options_for
from splitserve.decode_worker.worker import DecodeWorker
from splitserve.engine import SamplingParams
from splitserve.prefill_worker.worker import PrefillWorker
from tests.support import tiny_cluster_config

ANSWER_S = 10  # generous for a loaded 2-core machine


def tiny_request(
    request_id: str = "r1", prompt_len: int = 12, max_tokens: int = 8, attempt: int = 0
) -> GenerateRequest:
    """A prompt of tokens 1..``prompt_len`` that decodes ``max_tokens`` tokens whatever it samples (no EOS stop)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return GenerateRequest(request_id, list(range(1, prompt_len + 1)), params, attempt=attempt)


@asynccontextmanager
async def decode_worker(model_dir) -> AsyncIterator[DecodeWorker]:
    """A ready decode worker of the tiny cluster config; its engine thread and KV receiver stopped on exit."""
    config = tiny_cluster_config(model_dir)
    worker = DecodeWorker("decode-0", options_for(config, config.decode, str(model_dir)))
    try:
        await worker.ready()
        yield worker
    finally:
        worker._thread.stop()
        worker.receiver.close()


@asynccontextmanager
async def prefill_worker(model_dir) -> AsyncIterator[PrefillWorker]:
    """A prefill worker of the tiny cluster config; its engine thread stopped on exit."""
    config = tiny_cluster_config(model_dir)
    worker = PrefillWorker("prefill-0", options_for(config, config.prefill, str(model_dir)))
    try:
        yield worker
    finally:
        worker._thread.stop()


async def next_failure(channel: AsyncIterator[ChannelMessage], request_id: str) -> StreamFailure:
    """The next failure posted for ``request_id`` on a worker's token channel (its tokens, if any, skipped); each
    message of the channel is awaited for at most ANSWER_S."""
    while True:
        for item in await asyncio.wait_for(channel.__anext__(), ANSWER_S):
            if isinstance(item, StreamFailure) and item.request_id == request_id:
                return item
