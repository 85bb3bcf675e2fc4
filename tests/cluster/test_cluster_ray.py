"""A real cluster: Ray actors in split pools on CPU, the tiny model, KV moved between processes."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from splitserve.cluster.controller import Cluster
from splitserve.cluster.messages import ErrorCode, GenerateRequest, RequestTiming, ServingError
from splitserve.engine import SamplingParams
from splitserve.engine.testing import hf_greedy_reference
from tests.support import tiny_cluster_config

pytestmark = pytest.mark.slow
MAX_NEW = 10


def _config(model_dir, **overrides):
    return tiny_cluster_config(
        model_dir, **{"prefill": {"num_kv_blocks": 128}, "decode": {"num_kv_blocks": 128}, **overrides}
    )


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [
        torch.randint(0, 256, (int(length),), generator=g).tolist()
        for length in torch.randint(3, 60, (n,), generator=g)
    ]


def _hf_greedy(model_dir, prompts):
    return hf_greedy_reference(model_dir, prompts, MAX_NEW)


async def _collect(
    cluster: Cluster, rid: str, prompt: list[int], timing: RequestTiming | None = None, max_new: int = MAX_NEW
):
    request = GenerateRequest(rid, prompt, SamplingParams(max_tokens=max_new, ignore_eos=True))
    tokens: list[int] = []
    async for batch in cluster.generate(request, timing):
        tokens.extend(t.token_id for t in batch.tokens)
    return tokens


async def _free_blocks(cluster: Cluster) -> dict[str, int]:
    return {s.worker_id: s.kv_blocks_free for s in await cluster.refresh_stats()}


def _booked(cluster: Cluster) -> dict[str, tuple[float, float, float]]:
    """The router's load still booked per worker: zero everywhere once every attempt is over, however it ended."""
    loads = cluster.router.loads()
    booked = {w: (load["pending_tokens"], load["held_tokens"], load["requests"]) for w, load in loads.items()}
    return {w: b for w, b in booked.items() if any(b)}


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


async def _serve_all(cluster: Cluster, prompts: list[list[int]], tag: str):
    """Every prompt at once; their tokens, timings, and each worker's free pages before and after."""
    before = await _free_blocks(cluster)
    timings = [RequestTiming(arrival=0.0) for _ in prompts]
    got = await asyncio.gather(*(_collect(cluster, f"{tag}{i}", p, timings[i]) for i, p in enumerate(prompts)))
    await asyncio.sleep(0.2)
    return got, timings, before, await _free_blocks(cluster)


@pytest.mark.parametrize(
    ("mode", "pools"), [("disaggregated", (1, 1)), ("disaggregated", (2, 2)), ("colocated", (0, 1))]
)
def test_concurrent_requests_equal_hf_greedy(ray_local, tiny_model_dir, mode, pools):
    prompts = _prompts(8)
    config = _config(tiny_model_dir, mode=mode, prefill={"replicas": max(pools[0], 1)}, decode={"replicas": pools[1]})

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        try:
            return await _serve_all(cluster, prompts, "r")
        finally:
            await cluster.shutdown()

    got, timings, before, after = _run(scenario())
    assert got == _hf_greedy(tiny_model_dir, prompts)
    assert after == before  # every page came back, on both sides
    # Every worker served some of the requests: routing did not collapse onto one pair.
    assert {t.decode_worker for t in timings} == {f"decode-{i}" for i in range(pools[1])}
    if mode == "disaggregated":
        assert {t.prefill_worker for t in timings} == {f"prefill-{i}" for i in range(pools[0])}
        assert all(t.kv_transfer_s is not None and t.kv_transfer_s > 0 for t in timings)
        # The exposed part starts at the first token, inside the transfer's span (which starts with the last pass).
        assert all(t.kv_exposed_s is not None and 0 <= t.kv_exposed_s < t.kv_transfer_s for t in timings)


def test_cancel_frees_pages_everywhere(ray_local, tiny_model_dir):
    config = _config(tiny_model_dir)

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        try:
            before = await _free_blocks(cluster)
            request = GenerateRequest("long", list(range(50)), SamplingParams(max_tokens=500, ignore_eos=True))
            stream = cluster.generate(request)
            await stream.__anext__()  # the first token: prefill done, decoding under way
            await stream.aclose()  # the client goes away
            await asyncio.sleep(0.3)
            return before, await _free_blocks(cluster), cluster._inflight, _booked(cluster)
        finally:
            await cluster.shutdown()

    before, after, inflight, booked = _run(scenario())
    assert after == before and not inflight and booked == {}


async def _until_booked(cluster: Cluster, worker_id: str) -> None:
    """Wait until the router has placed a request on the worker, so killing it must cost that request an attempt."""
    while not cluster.router.loads()[worker_id]["requests"]:
        await asyncio.sleep(0.002)


def test_dead_decode_worker_is_retried_without_losing_tokens(ray_local, tiny_model_dir):
    prompts = _prompts(3)
    max_new = 64  # long enough that the victim still holds its request when it is killed
    config = _config(tiny_model_dir, decode={"replicas": 2})

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        try:
            victim = cluster.workers["decode-0"]
            pid = victim.info["pid"]
            timings = [RequestTiming(arrival=0.0) for _ in prompts]
            tasks = [
                asyncio.ensure_future(_collect(cluster, f"k{i}", p, timings[i], max_new)) for i, p in enumerate(prompts)
            ]
            await asyncio.wait_for(_until_booked(cluster, "decode-0"), 60)
            os.kill(pid, signal.SIGKILL)
            got = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            return got, timings, _booked(cluster)
        finally:
            await cluster.shutdown()

    got, timings, booked = _run(scenario())
    # No token lost or duplicated across the retry.
    assert got == hf_greedy_reference(tiny_model_dir, prompts, max_new)
    assert sum(t.retries for t in timings) >= 1
    assert all(t.kv_transfer_bytes for t in timings)  # the figures of each request's last attempt, retried or not
    assert booked == {}  # the attempts on the dead worker gave their booking back too


def test_overload_is_resource_exhausted(ray_local, tiny_model_dir):
    config = _config(tiny_model_dir, router={"max_queue": 1})

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        try:
            first = cluster.generate(GenerateRequest("a", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)))
            await first.__anext__()
            with pytest.raises(ServingError) as info:
                await cluster.generate(GenerateRequest("b", [1, 2], SamplingParams())).__anext__()
            await first.aclose()
            return info.value.code
        finally:
            await cluster.shutdown()

    assert _run(scenario()) == ErrorCode.RESOURCE_EXHAUSTED


def test_a_reservation_the_decode_worker_refuses_fails_before_any_token_and_frees_the_prefill(
    ray_local, tiny_model_dir
):
    """P computes while D reserves: where D has no room, the client gets D's RESOURCE_EXHAUSTED and no token, and
    P's pages (its pass ran, its transfer never opened) come back."""
    config = _config(tiny_model_dir, decode={"num_kv_blocks": 16})  # 128 tokens of KV (blocks of 8)

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        try:
            before = await _free_blocks(cluster)
            long = GenerateRequest("long", list(range(3, 63)), SamplingParams(max_tokens=200, ignore_eos=True))
            holding = cluster.generate(long)  # 60 tokens and growing: 8 of the 16 blocks, then more
            await holding.__anext__()
            tokens: list[int] = []
            with pytest.raises(ServingError) as refused:
                async for batch in cluster.generate(GenerateRequest("big", list(range(3, 73)), SamplingParams())):
                    tokens.extend(t.token_id for t in batch.tokens)
            failed_before_any_token = _booked(cluster)
            await holding.aclose()
            fits = await _collect(cluster, "fits", list(range(3, 20)))
            await asyncio.sleep(0.2)
            return refused.value, tokens, fits, before, await _free_blocks(cluster), failed_before_any_token
        finally:
            await cluster.shutdown()

    refused, tokens, fits, before, after, failed_before_any_token = _run(scenario())
    # Only the request still holding is booked: the refused one gave its prefill and decode booking back.
    assert set(failed_before_any_token) == {"decode-0"} and failed_before_any_token["decode-0"][2] == 1
    assert refused.code == ErrorCode.RESOURCE_EXHAUSTED and "KV cache full" in str(refused), str(refused)
    assert tokens == [] and len(fits) == MAX_NEW
    assert after == before


def test_a_hybrid_worker_runs_the_prompts_prefill_cannot_take(ray_local, tiny_model_dir):
    """The prefill worker queues one request at a time: without the hybrid pool the rest would be refused."""
    prompts = _prompts(6)
    config = _config(
        tiny_model_dir,
        prefill={"max_queue": 1},
        hybrid={"replicas": 1, "gpus_per_replica": 0, "num_kv_blocks": 128},
    )

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        try:
            got, timings, before, after = await _serve_all(cluster, prompts, "m")
            status = await cluster.status()
            emptied = await cluster.scale("hybrid", 0)  # the hybrid pool is optional: it can go
            return got, timings, before, after, status, emptied, await cluster.status()
        finally:
            await cluster.shutdown()

    got, timings, before, after, status, emptied, status_after = _run(scenario())
    assert got == _hf_greedy(tiny_model_dir, prompts)
    assert after == before
    assert {w["role"] for w in status["workers"]} == {"prefill", "decode", "hybrid"}
    assert emptied.removed == ["hybrid-0"] and {w["role"] for w in status_after["workers"]} == {"prefill", "decode"}
    ran_whole = [t for t in timings if t.prefill_worker == "hybrid-0"]
    assert ran_whole and all(t.decode_worker == "hybrid-0" and t.kv_transfer_s is None for t in ran_whole)
    assert any(t.prefill_worker == "prefill-0" for t in timings)


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("gpus_each", "backend"),
    [
        (0.5, "auto"),  # both actors on one GPU: auto picks CUDA IPC
        (0.5, "cuda_ipc"),
        (0.5, "grpc"),
        pytest.param(1, "auto", marks=[pytest.mark.multigpu, two_gpus]),  # one GPU each: auto picks NCCL
        pytest.param(1, "nccl", marks=[pytest.mark.multigpu, two_gpus]),
    ],
)
def test_split_pools_on_gpus(ray_local, tiny_model_dir, gpus_each, backend):
    """1 prefill + 1 decode actor sharing a GPU, or on one GPU each: same tokens as HF, every page back."""
    prompts = _prompts(6)
    config = _config(
        tiny_model_dir,
        cluster={"device": "cuda"},
        prefill={"gpus_per_replica": gpus_each},
        decode={"gpus_per_replica": gpus_each},
        kv_transfer={"backend": backend},
    )

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        try:
            before = await _free_blocks(cluster)
            got = await asyncio.gather(*(_collect(cluster, f"g{i}", p) for i, p in enumerate(prompts)))
            await asyncio.sleep(0.2)
            gpus = {w.info.get("gpu_uuid") for w in cluster.workers.values()}
            return got, before, await _free_blocks(cluster), gpus
        finally:
            await cluster.shutdown()

    got, before, after, gpus = _run(scenario())
    assert len(gpus) == (1 if gpus_each < 1 else 2)  # the workers really share a GPU, or really do not
    assert got == _hf_greedy(tiny_model_dir, prompts)
    assert after == before
