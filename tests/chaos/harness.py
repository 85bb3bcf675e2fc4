"""A real cluster on CPU for the chaos suite, driven from one event loop, and the audit every chaos test ends with.

The audit is the suite's point: after any storm of cancels or deaths, every worker's pages are back (free ==
total), nothing is held or expected anywhere (engine ``held``, the prefill worker's jobs, the receiver's pending
expectations), the controller has nothing in flight and the router has nothing booked.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from splitserve.cluster.controller import Cluster
from splitserve.cluster.messages import ErrorCode, GenerateRequest, RequestTiming, ServingError, WorkerStats
from splitserve.engine import SamplingParams
from tests.support import tiny_cluster_config

AUDIT_DEADLINE_S = 8.0  # far below kv_transfer.timeout_s: a leak freed only by a timeout fails the audit
TRANSFER_TIMEOUT_S = 30.0


def chaos_config(model_dir, **overrides):
    defaults: dict[str, Any] = {
        "prefill": {"replicas": 2, "num_kv_blocks": 512},
        "decode": {"replicas": 2, "num_kv_blocks": 1024, "max_batch_size": 32},
        # Small chunks: a 600-token prompt is ~120 messages, so transfers are long enough to be cut mid-way.
        "kv_transfer": {"timeout_s": TRANSFER_TIMEOUT_S, "chunk_bytes": 4096},
        "router": {"max_retries": 2},
    }
    for key, value in overrides.items():
        defaults[key] = {**defaults.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_cluster_config(model_dir, **defaults)


def prompts(n: int, lo: int = 4, hi: int = 40, seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [torch.randint(0, 256, (int(k),), generator=g).tolist() for k in lengths]


@dataclass
class Outcome:
    """One client's request: how it ended (exactly one of tokens / error / cancelled is meaningful)."""

    request_id: str
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    status: str = "pending"  # completed | error | cancelled
    error: ServingError | None = None
    timing: RequestTiming = field(default_factory=lambda: RequestTiming(arrival=time.monotonic()))


async def run_request(
    cluster: Cluster,
    rid: str,
    prompt: list[int],
    max_tokens: int,
    *,
    close_after_tokens: int | None = None,
    first_token: asyncio.Event | None = None,
    out: Outcome | None = None,
) -> Outcome:
    """Stream one request as a client would; ``close_after_tokens`` closes the stream (the client goes away)."""
    out = out or Outcome(rid, max_tokens)
    request = GenerateRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    stream = cluster.generate(request, out.timing)
    try:
        async for batch in stream:
            out.tokens.extend(t.token_id for t in batch.tokens)
            if first_token is not None and out.tokens:
                first_token.set()
            if close_after_tokens is not None and len(out.tokens) >= close_after_tokens and not batch.finished:
                out.status = "cancelled"
                return out
            if batch.finished:
                out.status = "completed"
        if out.status != "completed":
            out.status = "error"  # a stream that ends unfinished is a bug the caller asserts on
    except ServingError as err:
        out.status, out.error = "error", err
    except asyncio.CancelledError:
        out.status = "cancelled"
        raise
    finally:
        await stream.aclose()
    return out


class Harness:
    """One cluster and the loop it lives on, shared by a module's tests (starting one costs ~10 s on 2 cores)."""

    def __init__(self, config):
        self.loop = asyncio.new_event_loop()
        self.cluster = Cluster(config)
        self.run(self.cluster.start())
        self.totals = {s.worker_id: s.kv_blocks_total for s in self.run(self.cluster.refresh_stats())}

    def run(self, coro: Awaitable[Any], timeout: float = 120.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self.run(self.cluster.shutdown())
        self.loop.close()

    # --- audit ---

    def leftovers(self, stats: list[WorkerStats]) -> dict[str, dict[str, float]]:
        """What each worker still holds; empty when clean."""
        bad: dict[str, dict[str, float]] = {}
        for s in stats:
            held = {
                "used_blocks": float(s.kv_blocks_total - s.kv_blocks_free),
                "total_changed": float(s.kv_blocks_total != self.totals.get(s.worker_id, s.kv_blocks_total)),
                "queued": float(s.queued_requests),
                "active": float(s.active_requests),
                **{k: s.extra.get(k, 0.0) for k in ("held", "jobs", "pending_transfers", "expected", "streams")},
            }
            held = {k: v for k, v in held.items() if v}
            if held:
                bad[s.worker_id] = held
        cluster = self.cluster
        if cluster._inflight:
            bad["controller"] = {"inflight": float(len(cluster._inflight))}
        booked = {w: load["requests"] for w, load in cluster.router.loads().items() if load["requests"]}
        if booked:
            bad["router"] = {f"{w}.requests": float(n) for w, n in booked.items()}
        return bad

    async def audit(self, deadline_s: float = AUDIT_DEADLINE_S) -> float:
        """Poll until nothing is held anywhere; returns how long that took. Fails with what is left otherwise."""
        t0 = time.monotonic()
        while True:
            await self.wait_restarted()
            stats = await self.cluster.refresh_stats()
            bad = self.leftovers(stats)
            if not bad and len(stats) == len(self.cluster.workers):
                return time.monotonic() - t0
            if time.monotonic() - t0 > deadline_s:
                raise AssertionError(f"state left after {deadline_s} s: {bad}")
            await asyncio.sleep(0.05)

    async def wait_restarted(self, deadline_s: float = 60.0) -> None:
        """Every worker registered and healthy (a restart in progress has a fresh actor without info yet)."""
        t0 = time.monotonic()
        while not all(w.info and w.healthy for w in self.cluster.workers.values()) or len(
            self.cluster.router.loads()
        ) != len(self.cluster.workers):
            if time.monotonic() - t0 > deadline_s:
                raise AssertionError("workers were not restarted in time")
            await asyncio.sleep(0.1)


async def cancel_at_random(tasks: list[asyncio.Task], rng: random.Random, max_delay_s: float) -> None:
    """The clients of ``tasks`` give up at random moments within ``max_delay_s``."""

    async def later(task: asyncio.Task) -> None:
        await asyncio.sleep(rng.uniform(0.0, max_delay_s))
        task.cancel()

    await asyncio.gather(*(later(t) for t in tasks))


async def start_until_a_first_token(
    h: Harness, tag: str, ps: list[list[int]], max_tokens: int, deadline_s: float = 30
) -> list[asyncio.Task]:
    """Start the requests (``{tag}-{i}``) and return once any has its first token: the rest are mid-prefill or
    mid-transfer."""
    first = asyncio.Event()
    tasks = [
        asyncio.ensure_future(run_request(h.cluster, f"{tag}-{i}", p, max_tokens, first_token=first))
        for i, p in enumerate(ps)
    ]
    await asyncio.wait_for(first.wait(), deadline_s)
    return tasks


async def settle(tasks: list[asyncio.Task], timeout_s: float) -> None:
    """Every client task ends (completed, failed or cancelled) within the bound: nothing hangs."""
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    assert not pending, f"{len(pending)} requests hung for {timeout_s} s"


async def until(pred: Callable[[], bool], deadline_s: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > deadline_s:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def serve_after_restart(
    h: Harness, worker_id: str, restarts: int, rid: str, prompt: list[int], max_tokens: int
) -> Outcome:
    """Once ``worker_id`` has restarted (more than ``restarts``) and nothing is held anywhere: one request served by
    the fresh worker, and nothing held again after it."""
    await until(lambda: h.cluster.workers[worker_id].restarts > restarts, 60, f"{worker_id} restarted")
    await h.audit(deadline_s=60)
    again = await run_request(h.cluster, rid, prompt, max_tokens)
    await h.audit()
    return again


def assert_cut_short_cleanly(outs: list[Outcome], want: list[list[int]]) -> None:
    """A death mid-request: each request completed with its reference tokens (retried elsewhere, or untouched) or
    failed UNAVAILABLE, and the death did cut some short."""
    for o, tokens in zip(outs, want, strict=True):
        if o.status == "completed":
            assert o.tokens == tokens, o.request_id
        else:
            assert o.status == "error" and o.error is not None and o.error.code == ErrorCode.UNAVAILABLE, o
    assert any(o.status == "error" or o.timing.retries for o in outs)


def kill_mid_request(
    h: Harness,
    worker_id: str,
    pid: int,
    ps: list[list[int]],
    want: list[list[int]],
    max_tokens: int,
    tag: str,
    *,
    sent_after_kill: int = 0,
    timeout: float = 400,
) -> None:
    """SIGKILL ``pid`` (a process of ``worker_id``) once one of the requests sent first has its first token, then
    send the last ``sent_after_kill`` of ``ps``: each request completes with its ``want`` tokens or fails
    UNAVAILABLE, none hangs, and the restarted worker serves again with nothing left held anywhere."""
    restarts = h.cluster.workers[worker_id].restarts
    first_wave = len(ps) - sent_after_kill

    async def scenario() -> tuple[list[Outcome], Outcome]:
        tasks = await start_until_a_first_token(h, tag, ps[:first_wave], max_tokens, deadline_s=60)
        os.kill(pid, signal.SIGKILL)
        tasks += [
            asyncio.ensure_future(run_request(h.cluster, f"{tag}-{i}", ps[i], max_tokens))
            for i in range(first_wave, len(ps))
        ]
        await settle(tasks, timeout_s=180)
        again = await serve_after_restart(h, worker_id, restarts, f"{tag}-after", ps[0], max_tokens)
        return [t.result() for t in tasks], again

    outs, again = h.run(scenario(), timeout=timeout)
    assert_cut_short_cleanly(outs, want)
    assert again.status == "completed" and again.tokens == want[0]
