"""Disaggregated serving between pools of different tensor-parallel degrees, on a real cluster (Ray actors, gloo
ranks on CPU, the tiny model: 2 KV heads, so 4 decode ranks hold each head twice): each prefill rank sends its KV
heads straight to the decode ranks that hold them, and the decode leader admits a request once every rank's part
landed. Greedy output equals HF's, and a follower killed mid-request (a prefill rank or a decode rank) leaves each
request retried or failed UNAVAILABLE, and nothing held anywhere."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.engine.testing import hf_greedy_reference
from tests.chaos.harness import Harness, chaos_config, kill_mid_request, prompts, run_request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
MAX_NEW = 8
LONG = 40


def _layouts(*layouts: tuple[int, int]) -> pytest.MarkDecorator:
    """Run the test on a cluster of each (prefill, decode) tensor-parallel layout; tests of one layout share it."""
    return pytest.mark.parametrize("h", layouts, indirect=True, ids=lambda tp: f"p{tp[0]}-d{tp[1]}")


ALL_LAYOUTS = _layouts((2, 1), (1, 2), (2, 4))


@pytest.fixture(scope="module")
def h(request, ray_local, tiny_model_dir):
    prefill_tp, decode_tp = request.param
    config = chaos_config(
        tiny_model_dir,
        prefill={"replicas": 1, "tensor_parallel_size": prefill_tp, "num_kv_blocks": 256, "max_batch_tokens": 512},
        decode={"replicas": 1, "tensor_parallel_size": decode_tp, "num_kv_blocks": 256},
        router={"max_retries": 2},
    )
    harness = Harness(config)
    harness.layout = request.param  # type: ignore[attr-defined]
    try:
        yield harness
    finally:
        harness.close()


@ALL_LAYOUTS
def test_concurrent_requests_get_hf_greedy_tokens_with_the_kv_moved_rank_to_rank(h, tiny_model_dir):
    """Beside them, clients that leave at their first token (while the KV may still be moving): their aborts free
    every rank's part, and nothing is left held or expected anywhere."""
    # Up to 5 blocks of 8 tokens each, and one of ~50: the links carry several pages per layer, and the long prompt's
    # step is longer than the hand-off's first buffer (the step's rest and its transfer orders follow it).
    ps = prompts(6, lo=3, hi=40, seed=53)
    served, left = [*ps[:4], *prompts(1, lo=380, hi=420, seed=54)], ps[4:]

    async def scenario():
        outs = await asyncio.gather(
            *(run_request(h.cluster, f"split-{i}", p, MAX_NEW) for i, p in enumerate(served)),
            *(run_request(h.cluster, f"left-{i}", p, MAX_NEW, close_after_tokens=1) for i, p in enumerate(left)),
        )
        await h.audit()
        return outs

    outs = h.run(scenario())
    assert [o.status for o in outs] == ["completed"] * len(served) + ["cancelled"] * len(left)
    assert [o.tokens for o in outs[: len(served)]] == hf_greedy_reference(tiny_model_dir, served, MAX_NEW)
    prefill_tp, decode_tp = h.layout
    decode = h.cluster.workers["decode-0"].info
    assert len(decode["endpoint"].by_rank) == decode_tp  # one receiver per decode rank
    assert [f["endpoint"] for f in decode["followers"]] == list(decode["endpoint"].ranks)
    assert len(h.cluster.workers["prefill-0"].info["followers"]) == prefill_tp - 1


@ALL_LAYOUTS
def test_a_second_turn_moves_only_the_blocks_the_decode_ranks_lack(h, tiny_model_dir):
    """Incremental transfer between groups: the decode group keeps turn 1's prompt and answer, so turn 2's every
    prefill rank sends only the later blocks, and the answer still equals HF's."""
    (first,) = prompts(1, lo=30, hi=31, seed=61)
    (message,) = prompts(1, lo=10, hi=11, seed=62)

    async def scenario():
        turn1 = await run_request(h.cluster, "turn-1", first, MAX_NEW)
        second = first + turn1.tokens + message
        turn2 = await run_request(h.cluster, "turn-2", second, MAX_NEW)
        await h.audit()
        return turn1, second, turn2

    turn1, second, turn2 = h.run(scenario())
    assert turn2.tokens == hf_greedy_reference(tiny_model_dir, [second], MAX_NEW)[0]
    block = 8
    held = (len(first) + MAX_NEW - 1) // block  # full blocks of the prompt and the answer but its last token
    per_block = turn1.timing.kv_transfer_bytes / -(-len(first) // block)
    assert turn2.timing.kv_transfer_bytes == per_block * (-(-len(second) // block) - held)


@_layouts((2, 1), (1, 2))  # one prefill follower (p2-d1) and one decode follower (p1-d2) to kill
def test_a_follower_killed_mid_request_retries_or_fails_it_and_strands_nothing(h, tiny_model_dir):
    """A decode follower dies under the first wave's decodes; a prefill follower under the second wave's prompts,
    sent right after the kill. Each request completes with HF's tokens (retried on the restarted group) or fails
    UNAVAILABLE; then no page is held on any worker and nothing is booked at the router, and the fresh group
    serves."""
    role = "prefill" if h.layout[0] > 1 else "decode"
    ps = prompts(5, lo=20, hi=40, seed=59)
    want = hf_greedy_reference(tiny_model_dir, ps, LONG)
    (follower,) = h.cluster.workers[f"{role}-0"].info["followers"]
    kill_mid_request(h, f"{role}-0", follower["pid"], ps, want, LONG, f"kill-{role}", sent_after_kill=2, timeout=400)
