"""Faults and abort storms on a real cluster (Ray, the tiny model): nothing stranded, nothing hung, recovery in
seconds. Every test ends with ``Harness.audit``: every page back, nothing held or expected.

Each scenario runs on CPU with KV over grpc, and (marked ``gpu``, for ``make test-gpu``) with all four workers
sharing one GPU and KV over cuda_ipc, whose senders write the decode workers' pages themselves."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
import ray
import torch

from splitserve.cluster.messages import ErrorCode, GenerateRequest, ServingError
from splitserve.engine import SamplingParams
from tests.chaos.harness import (
    Harness,
    Outcome,
    cancel_at_random,
    chaos_config,
    prompts,
    run_request,
    settle,
    start_until_a_first_token,
    until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
LONG_PROMPT = 600  # ~120 grpc messages at 4 KiB chunks: a transfer long enough to be cut mid-way


ON_ONE_GPU = {
    "cluster": {"device": "cuda"},
    "prefill": {"gpus_per_replica": 0.25},
    "decode": {"gpus_per_replica": 0.25},
    "kv_transfer": {"backend": "cuda_ipc"},
}
PLACEMENTS = [
    pytest.param({"kv_transfer": {"backend": "grpc"}}, id="cpu-grpc"),
    pytest.param({"kv_transfer": {"backend": "tcp"}}, id="cpu-tcp"),
    pytest.param(
        ON_ONE_GPU,
        id="gpu-cuda_ipc",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


@pytest.fixture(scope="module", params=PLACEMENTS)
def harness(request, ray_local, tiny_model_dir):
    h = Harness(chaos_config(tiny_model_dir, **request.param))
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def h(harness):
    """Each test starts clean (and the previous one's audit must have passed)."""
    harness.run(harness.audit())
    return harness


async def _batch(h: Harness, tag: str, ps: list[list[int]], max_tokens: int) -> tuple[float, list[Outcome]]:
    t0 = time.monotonic()
    outs = await asyncio.gather(*(run_request(h.cluster, f"{tag}-{i}", p, max_tokens) for i, p in enumerate(ps)))
    return time.monotonic() - t0, list(outs)


def _assert_completed(outs: list[Outcome]) -> None:
    for o in outs:
        assert o.status == "completed", (o.request_id, o.status, o.error)
        assert len(o.tokens) == o.max_tokens, (o.request_id, len(o.tokens))


# --- abort storm ---


def test_abort_storm(h):
    """~150 concurrent requests, most cancelled by their clients at random moments in every phase; survivors finish
    with the right token counts, everything is freed, and a follow-up batch runs about as fast as before."""
    rng = random.Random(1234)
    follow = prompts(12, seed=3)

    async def scenario():
        before_s, before = await _batch(h, "pre", follow, 16)
        _assert_completed(before)

        ps = prompts(150, seed=11)
        outs = [Outcome(f"storm-{i}", rng.randint(20, 60)) for i in range(len(ps))]
        tasks, doomed = [], []
        for i, (p, out) in enumerate(zip(ps, outs, strict=True)):
            kind = i % 5  # 0: survives; 1: aclose right after the first token; 2: aclose mid-decode; 3, 4: cancel()
            close_after = {1: 1, 2: rng.randint(2, out.max_tokens - 1)}.get(kind)
            task = asyncio.ensure_future(
                run_request(h.cluster, out.request_id, p, out.max_tokens, close_after_tokens=close_after, out=out)
            )
            tasks.append(task)
            if kind in (3, 4):
                doomed.append(task)
            if i % 10 == 0:
                await asyncio.sleep(0)  # let some start before the rest arrive
        await cancel_at_random(doomed, rng, max_delay_s=2.0)
        await settle(tasks, timeout_s=60)
        freed_s = await h.audit()

        after_s, after = await _batch(h, "post", follow, 16)
        _assert_completed(after)
        return outs, before_s, after_s, freed_s

    outs, before_s, after_s, freed_s = h.run(scenario())
    statuses = [o.status for o in outs]
    assert "pending" not in statuses and "error" not in statuses, [(o.request_id, o.error) for o in outs if o.error]
    survivors = [o for i, o in enumerate(outs) if i % 5 == 0]
    _assert_completed(survivors)
    for o in outs:  # cancelled or not, no client ever got more than it asked for
        assert len(o.tokens) <= o.max_tokens
        if o.status == "completed":
            assert len(o.tokens) == o.max_tokens
    assert sum(s == "cancelled" for s in statuses) >= 60  # the storm really cancelled most of them
    assert freed_s < 5.0
    assert after_s < max(3 * before_s, before_s + 5.0), (before_s, after_s)  # throughput recovered


# --- the client disconnects in each window ---


def test_cancel_before_first_token(h):
    """Cancelled while reserving pages, queued at the prefill worker, or computing the prompt."""

    async def scenario():
        ps = prompts(24, lo=100, hi=250, seed=21)
        tasks = [asyncio.ensure_future(run_request(h.cluster, f"early-{i}", p, 30)) for i, p in enumerate(ps)]
        for _ in range(3):  # every task has started: each is somewhere before its first token
            await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        await settle(tasks, timeout_s=20)
        assert all(t.cancelled() or t.result().status in ("cancelled", "completed") for t in tasks)
        return await h.audit()

    assert h.run(scenario()) < 5.0


def test_cancel_after_first_token_before_admission(h):
    """The client goes away with the first token: the prompt is computed, the KV is (being) sent, decode has not
    admitted it. Prefill's source pages and decode's reservation are both freed at once (no 30 s timeout)."""

    async def scenario():
        ps = prompts(10, lo=LONG_PROMPT, hi=LONG_PROMPT + 50, seed=31)
        outs = await asyncio.gather(
            *(run_request(h.cluster, f"first-{i}", p, 40, close_after_tokens=1) for i, p in enumerate(ps))
        )
        assert all(o.status == "cancelled" and len(o.tokens) == 1 for o in outs), [
            (o.status, o.error, len(o.tokens)) for o in outs if o.status != "cancelled" or len(o.tokens) != 1
        ]
        return await h.audit()

    assert h.run(scenario()) < 5.0


def test_cancel_mid_transfer(h):
    """Long prompts over a slow (4 KiB-chunk) transfer, cancelled the moment any first token shows: the others are
    mid-prefill or mid-transfer. The transfer must stop by message, not spin until kv_transfer.timeout_s."""

    async def scenario():
        tasks = await start_until_a_first_token(
            h, "mid", prompts(10, lo=LONG_PROMPT, hi=LONG_PROMPT + 100, seed=41), 40
        )
        t0 = time.monotonic()
        for t in tasks:
            t.cancel()
        await settle(tasks, timeout_s=10)
        await h.audit()
        return time.monotonic() - t0

    assert h.run(scenario()) < 5.0


def test_cancel_mid_decode(h):
    async def scenario():
        ps = prompts(20, seed=51)
        outs = await asyncio.gather(
            *(run_request(h.cluster, f"dec-{i}", p, 50, close_after_tokens=5 + i) for i, p in enumerate(ps))
        )
        assert all(o.status == "cancelled" and 5 + i <= len(o.tokens) < 50 for i, o in enumerate(outs)), [
            (i, o.status, len(o.tokens), o.error) for i, o in enumerate(outs)
        ]
        return await h.audit()

    assert h.run(scenario()) < 5.0


def test_cluster_cancel_api(h):
    """Cluster.cancel (what the servers call on a client disconnect) frees everything too."""

    async def scenario():
        ps = prompts(12, lo=LONG_PROMPT, hi=LONG_PROMPT + 20, seed=61)
        tasks = await start_until_a_first_token(h, "api", ps, 40)
        results = await asyncio.gather(*(h.cluster.cancel(f"api-{i}") for i in range(len(ps))))
        assert any(results)
        await settle(tasks, timeout_s=10)
        return await h.audit()

    assert h.run(scenario()) < 5.0


def test_max_tokens_one_frees_the_decode_reservation(h):
    """A request finished by its first token never reaches decode: its reservation there must still be freed."""

    async def scenario():
        outs = await asyncio.gather(*(run_request(h.cluster, f"one-{i}", p, 1) for i, p in enumerate(prompts(8))))
        _assert_completed(outs)
        return await h.audit()

    assert h.run(scenario()) < 5.0


# --- workers die mid-transfer ---


@pytest.mark.parametrize(("role", "how"), [("prefill", "sigkill"), ("decode", "sigkill"), ("decode", "ray_kill")])
def test_worker_killed_mid_transfer(h, role, how):
    """A worker dies while KV is moving: requests are retried elsewhere (same greedy tokens, no gap, no duplicate)
    or fail cleanly, the health loop restarts the dead one, and every survivor's pages come back."""
    ps = prompts(8, lo=LONG_PROMPT, hi=LONG_PROMPT + 100, seed=71)

    async def scenario():
        _, reference = await _batch(h, f"ref-{role}-{how}", ps, 12)
        _assert_completed(reference)
        first = asyncio.Event()
        outs = [Outcome(f"kill-{role}-{how}-{i}", 12) for i in range(len(ps))]
        tasks = [
            asyncio.ensure_future(run_request(h.cluster, o.request_id, p, 12, first_token=first, out=o))
            for o, p in zip(outs, ps, strict=True)
        ]
        await asyncio.wait_for(first.wait(), 30)
        started = next(o for o in outs if o.tokens)
        victim_id = started.timing.prefill_worker if role == "prefill" else started.timing.decode_worker
        victim = h.cluster.workers[victim_id]
        if how == "sigkill":
            os.kill(victim.info["pid"], signal.SIGKILL)
        else:
            ray.kill(victim.actor)
        await settle(tasks, timeout_s=60)
        await until(lambda: h.cluster.workers[victim_id].restarts > victim.restarts, 20, f"{victim_id} restarted")
        await h.audit(deadline_s=30)  # includes the fresh worker's model load
        return reference, outs

    reference, outs = h.run(scenario())
    for ref, o in zip(reference, outs, strict=True):
        if o.status == "completed":
            assert o.tokens == ref.tokens, o.request_id  # a retry resumes exactly where the stream stopped
        else:
            assert o.status == "error" and o.error is not None, (o.request_id, o.status)
            assert o.error.code in (ErrorCode.UNAVAILABLE, ErrorCode.RESOURCE_EXHAUSTED), o.error
    assert sum(o.status == "completed" for o in outs) >= len(outs) // 2
    assert any(o.timing.retries for o in outs)


# --- a stalled decode worker (backpressure) ---


def test_stalled_decode_worker(h):
    """One decode worker is frozen (SIGSTOP) for a while: requests on the other keep completing meanwhile; once it
    resumes, its requests complete too and nothing is left held. No test hook: the process is simply stopped."""

    async def scenario():
        victim = h.cluster.workers["decode-1"]
        ps = prompts(16, seed=81)
        outs = [Outcome(f"stall-{i}", 20) for i in range(len(ps))]
        os.kill(victim.info["pid"], signal.SIGSTOP)
        try:
            tasks = [
                asyncio.ensure_future(run_request(h.cluster, o.request_id, p, 20, out=o))
                for o, p in zip(outs, ps, strict=True)
            ]
            fast = lambda: [o for o in outs if o.timing.decode_worker == "decode-0"]  # noqa: E731
            await until(lambda: bool(fast()) and all(o.status == "completed" for o in fast()), 20, "decode-0 served")
            assert all(o.status == "pending" for o in outs if o.timing.decode_worker == "decode-1")
        finally:
            os.kill(victim.info["pid"], signal.SIGCONT)
        await settle(tasks, timeout_s=30)
        await h.audit()
        return outs

    restarts = h.cluster.workers["decode-1"].restarts
    outs = h.run(scenario())
    _assert_completed(outs)
    assert h.cluster.workers["decode-1"].restarts == restarts  # a short stall is not a death


# --- overload ---


def test_overload_is_resource_exhausted_quickly(h):
    """Arrivals above router.max_queue are refused at once; the accepted ones still complete."""
    limit = 8
    saved = h.cluster.config.router.max_queue
    h.cluster.config.router.max_queue = limit

    async def scenario():
        ps = prompts(40, seed=91)
        accepted = [
            h.cluster.generate(GenerateRequest(f"ov-{i}", p, SamplingParams(max_tokens=30, ignore_eos=True)))
            for i, p in enumerate(ps[:limit])
        ]
        firsts = await asyncio.gather(*(s.__anext__() for s in accepted))  # admitted: they hold the queue's slots
        refused = 0
        for i, p in enumerate(ps[limit:]):
            t0 = time.monotonic()
            with pytest.raises(ServingError) as info:
                await h.cluster.generate(GenerateRequest(f"over-{i}", p, SamplingParams(max_tokens=30))).__anext__()
            assert info.value.code == ErrorCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - t0 < 0.5
            refused += 1

        async def rest(stream, first) -> int:
            n = len(first.tokens)
            async for batch in stream:
                n += len(batch.tokens)
            return n

        counts = await asyncio.gather(*(rest(s, f) for s, f in zip(accepted, firsts, strict=True)))
        await h.audit()
        return refused, counts

    try:
        refused, counts = h.run(scenario())
    finally:
        h.cluster.config.router.max_queue = saved
    assert refused == 32
    assert counts == [30] * limit
