"""Cluster-wide prefix reuse on real Ray workers (tiny model, CPU): the workers' cache events reach the router's
index, ``cache_aware`` sends a conversation's next turn to the prefill worker holding its prompt and to the decode
worker holding its prompt and answer, the prefill worker skips its cached prefix, the transfer moves only the pages
the decode worker lacks, the answer equals a cold run's, and evictions leave the index; a follow-up whose uncached
suffix is short runs on the decode worker holding the conversation alone, moving no KV."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import torch

from splitserve.cluster.controller import Cluster
from splitserve.cluster.messages import GenerateRequest, RequestTiming
from splitserve.engine import SamplingParams
from splitserve.engine.testing import hf_greedy_reference
from tests.support import tiny_cluster_config

pytestmark = pytest.mark.slow
MAX_NEW = 10
BLOCK = 8


async def _ask(cluster: Cluster, rid: str, prompt: list[int], session: str | None = None):
    request = GenerateRequest(rid, prompt, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True), session_id=session)
    timing = RequestTiming(arrival=time.monotonic())
    tokens: list[int] = []
    async for batch in cluster.generate(request, timing):
        tokens.extend(t.token_id for t in batch.tokens)
    return tokens, timing


async def _until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Cache events travel on the workers' channels, after the step that made them: wait for them."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the router's prefix index never caught up"
        await asyncio.sleep(0.02)


def _random(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_second_turn_reuses_the_prefix_where_it_is_cached(ray_local, tiny_model_dir):
    config = tiny_cluster_config(
        tiny_model_dir,
        router={"policy": "cache_aware", "local_prefill_max_tokens": 0},  # every turn split: its prefill side tested
        prefill={"replicas": 2, "num_kv_blocks": 24},  # 192 tokens: a few prompts evict a conversation
        decode={"replicas": 2, "num_kv_blocks": 128},
    )
    first = {"a": _random(50, 1), "b": _random(45, 2)}

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        try:
            index = cluster.router.prefix_index

            def held(prompt: list[int], worker: str) -> int:
                return index.cached_tokens(prompt, [worker])[worker]

            # Both first turns at once: a's booking on one prefill worker sends b to the other.
            answers = await asyncio.gather(*(_ask(cluster, f"{c}1", p) for c, p in first.items()))
            turn1 = dict(zip(first, answers, strict=True))
            for c, (tokens, timing) in turn1.items():
                await _until(lambda c=c, timing=timing: held(first[c], timing.prefill_worker) > 0)
                # The decode worker holds the full blocks of the prompt and the answer but its last token (whose KV
                # was never computed).
                context, kept = first[c] + tokens + [0], (len(first[c]) + MAX_NEW - 1) // BLOCK * BLOCK
                await _until(lambda ctx=context, kept=kept, w=timing.decode_worker: held(ctx, w) == kept)
            # Turn 2: the first prompt, its answer and a new message; one at a time, so load alone would pick the
            # same (first) prefill worker for both.
            second = {c: first[c] + turn1[c][0] + _random(12, 3 + i) for i, c in enumerate(first)}
            turn2 = {c: await _ask(cluster, f"{c}2", p) for c, p in second.items()}
            stats = {s.worker_id: s for s in await cluster.refresh_stats()}
            prefill_hits = sum(stats[w].prefix_cache_hit_blocks for w in ("prefill-0", "prefill-1"))
            # Evictions leave the index: other prompts, at once so both prefill workers get some, push b's blocks
            # out of its worker's cache.
            b_worker = turn1["b"][1].prefill_worker
            await asyncio.gather(*(_ask(cluster, f"x{i}", _random(90, 10 + i)) for i in range(4)))
            await _until(lambda: held(second["b"], b_worker) == 0)
            return turn1, second, turn2, prefill_hits
        finally:
            await cluster.shutdown()

    turn1, second, turn2, prefill_hits = asyncio.new_event_loop().run_until_complete(scenario())
    assert {t.prefill_worker for _, t in turn1.values()} == {"prefill-0", "prefill-1"}
    assert {t.decode_worker for _, t in turn1.values()} == {"decode-0", "decode-1"}
    for c in first:
        tokens, timing = turn2[c]
        before = turn1[c][1]
        # Where its prefix is cached: the prompt on the prefill side, prompt and answer on the decode side.
        assert (timing.prefill_worker, timing.decode_worker) == (before.prefill_worker, before.decode_worker)
        # The prefill worker skipped the first prompt's full blocks (its answer was decoded elsewhere)...
        assert timing.cached_prompt_tokens == len(first[c]) // BLOCK * BLOCK
        assert before.cached_prompt_tokens == 0
        # ...and the transfer moved only the blocks the decode worker lacks.
        held_blocks = (len(first[c]) + MAX_NEW - 1) // BLOCK
        per_block = before.kv_transfer_bytes / -(-len(first[c]) // BLOCK)
        assert timing.kv_transfer_bytes == per_block * (-(-len(second[c]) // BLOCK) - held_blocks)
        assert tokens == hf_greedy_reference(tiny_model_dir, [second[c]], MAX_NEW)[0]
    # The workers' stats count the same hits (status and /metrics show them): the first prompts' full blocks.
    assert prefill_hits == sum(len(first[c]) // BLOCK for c in first)


def test_a_short_follow_up_runs_alone_on_the_decode_worker_holding_the_conversation(ray_local, tiny_model_dir):
    config = tiny_cluster_config(
        tiny_model_dir,
        router={"policy": "cache_aware", "local_prefill_max_tokens": 32},
        decode={"replicas": 2, "num_kv_blocks": 128},
    )
    first = _random(50, 1)

    async def scenario():
        cluster = Cluster(config)
        await cluster.start()
        try:
            index = cluster.router.prefix_index
            turn1 = await _ask(cluster, "c1", first)
            tokens, timing = turn1
            # The decode worker holds the full blocks of the prompt and the answer but its last token.
            context, kept = first + tokens + [0], (len(first) + MAX_NEW - 1) // BLOCK * BLOCK
            w = timing.decode_worker
            await _until(lambda: index.cached_tokens(context, [w])[w] == kept)
            second = first + tokens + _random(12, 3)  # 16 tokens past the held blocks: within the 32
            turn2 = await _ask(cluster, "c2", second)
            return turn1, second, turn2, cluster.router.loads()
        finally:
            await cluster.shutdown()

    (_, before), second, (tokens, timing), loads = asyncio.new_event_loop().run_until_complete(scenario())
    assert before.prefill_worker == "prefill-0" and before.kv_transfer_bytes > 0  # a cold first turn is split
    # Turn 2 ran on turn 1's decode worker alone: it computed only the tokens past its cached blocks, moved no KV.
    assert timing.prefill_worker == timing.decode_worker == before.decode_worker
    assert timing.cached_prompt_tokens == (len(first) + MAX_NEW - 1) // BLOCK * BLOCK
    assert timing.kv_transfer_bytes == 0
    assert tokens == hf_greedy_reference(tiny_model_dir, [second], MAX_NEW)[0]
    # Its booking, on the decode worker only, came back.
    assert all(load["pending_tokens"] == load["held_tokens"] == load["requests"] == 0 for load in loads.values())
