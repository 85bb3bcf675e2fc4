"""The open-loop load generator: sends each request at its scheduled time through the async gRPC SDK.

Open loop means a send never waits for an earlier response, so a saturated cluster shows up as growing latency and
errors (as real traffic would make it) instead of as a politely slower client. Latencies are measured here, at the
client, from the send: TTFT to the first event carrying tokens, E2E to the last event, TPOT as the mean gap after
the first token, and the gap from the first token to the second on its own (where a disaggregated transfer's
unhidden part shows). The KV transfer time is the server's (the last event's timing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import replace

from splitserve.bench.metrics import OK, RequestRecord
from splitserve.bench.requests import BenchRequest
from splitserve.client import AsyncClient, SplitserveError


def _status(err: SplitserveError) -> str:
    return err.code.name.lower() if err.code is not None else "error"


async def send_one(client: AsyncClient, request: BenchRequest, timeout_s: float | None) -> RequestRecord:
    """One request, streamed to the end; an error becomes the record's status instead of an exception."""
    base = RequestRecord(request.index, len(request.prompt_token_ids), request.max_tokens, status=OK)
    sent = time.monotonic()
    first: float | None = None
    second: float | None = None
    tokens = 0
    kv_ms: float | None = None
    kv_exposed_ms: float | None = None
    try:
        stream = client.generate(
            prompt_token_ids=request.prompt_token_ids,
            max_tokens=request.max_tokens,
            ignore_eos=True,
            temperature=0.0,
            timeout=timeout_s,
        )
        async with aclosing(stream) as events:
            async for event in events:
                if event.token_ids:
                    now = time.monotonic()
                    first = first if first is not None else now
                    if second is None and tokens + len(event.token_ids) >= 2:
                        second = now  # the first event may carry both: then the gap is 0
                tokens += len(event.token_ids)
                if event.timing is not None:
                    kv_ms, kv_exposed_ms = event.timing.kv_transfer_ms, event.timing.kv_exposed_ms
    except SplitserveError as err:
        return replace(base, status=_status(err), output_tokens=tokens)
    end = time.monotonic()
    if first is None:
        return replace(base, status="no_tokens")
    return replace(
        base,
        output_tokens=tokens,
        ttft_ms=(first - sent) * 1000,
        tpot_ms=(end - first) * 1000 / (tokens - 1) if tokens > 1 else None,
        e2e_ms=(end - sent) * 1000,
        kv_transfer_ms=kv_ms,
        kv_exposed_ms=kv_exposed_ms,
        second_token_ms=None if second is None else (second - first) * 1000,
    )


async def run_load(
    client: AsyncClient, requests: Sequence[BenchRequest], timeout_s: float | None = None
) -> tuple[list[RequestRecord], float]:
    """Send ``requests`` on their schedule; return their records (in request order) and the run's duration, from
    the first send to the last response."""
    start = time.monotonic()
    tasks = []
    for request in sorted(requests, key=lambda r: r.arrival_s):
        delay = start + request.arrival_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send_one(client, request, timeout_s)))
    records = await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r.index), time.monotonic() - start
