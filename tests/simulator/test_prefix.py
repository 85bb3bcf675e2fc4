"""The simulator's prefix model on conversations small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from splitserve.simulator.cluster import ClusterSpec, PoolSpec
from splitserve.simulator.engine import simulate
from splitserve.simulator.prefix import PrefixCache
from splitserve.simulator.router import Router
from splitserve.simulator.turns import per_turn
from splitserve.simulator.workload import multiturn
from tests.simulator.conftest import make_profile

MESSAGES, ANSWERS = [200, 30, 50], [20, 40, 10]


def one_conversation(think_s: float = 1.0):
    return multiturn([[(m, a, think_s) for m, a in zip(MESSAGES, ANSWERS, strict=True)]])


def prompts() -> list[int]:
    """Turn k's prompt: every earlier message and answer, then its message."""
    return [sum(MESSAGES[:k]) + sum(ANSWERS[:k]) + MESSAGES[k] for k in range(3)]


def test_the_workload_chains_each_turn_to_the_previous_one():
    wl = multiturn([[(100, 10, 2.0), (5, 7, 1.0)], [(50, 3, 0.5)]])
    conv = wl.conversations
    assert conv is not None
    # First turns first, by arrival; then the follow-up, whose arrival the run decides.
    assert wl.prompt_tokens.tolist() == [50, 100, 115]
    assert wl.output_tokens.tolist() == [3, 10, 7]
    assert conv.conversation.tolist() == [1, 0, 0]
    assert conv.previous.tolist() == [-1, -1, 1]
    assert conv.prefix_tokens.tolist() == [0, 0, 110]
    assert wl.arrival_s[:2].tolist() == [0.5, 2.0] and np.isnan(wl.arrival_s[2])


def test_colocated_on_one_worker_computes_only_each_turns_message():
    """The worker holds the whole context it ended the previous turn with (less the answer's last token, whose KV
    is never computed), so a turn computes its message and that one token."""
    cluster = ClusterSpec("colocated", PoolSpec(1, make_profile()))
    result = simulate(cluster, one_conversation())
    assert result.prefix is not None
    p = prompts()
    assert result.workload.prompt_tokens.tolist() == p
    assert result.prefix.cached_tokens.tolist() == [0, p[0] + ANSWERS[0] - 1, p[1] + ANSWERS[1] - 1]
    turns = per_turn(result)
    assert [t.computed_tokens for t in turns] == [MESSAGES[0], MESSAGES[1] + 1, MESSAGES[2] + 1]
    # One worker that keeps everything is the oracle: its hit rate is the oracle's on every turn.
    assert [t.hit_rate for t in turns] == pytest.approx([t.oracle_hit_rate for t in turns])
    assert turns[1].oracle_hit_rate == pytest.approx((p[0] + ANSWERS[0] - 1) / p[1])
    assert result.prefix.moved_tokens.tolist() == [0, 0, 0]


def test_disaggregated_prefill_recomputes_the_answer_and_decode_receives_only_the_new_tokens():
    """The prefill worker holds the prompts it computed (not the answers, made on the decode worker); the decode
    worker holds the context, so only the turn's message and the answer's last token move."""
    toy = make_profile()
    result = simulate(ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, toy)), one_conversation())
    assert result.prefix is not None
    p = prompts()
    assert result.prefix.cached_tokens.tolist() == [0, p[0], p[1]]
    assert [t.computed_tokens for t in per_turn(result)] == [p[0], ANSWERS[0] + MESSAGES[1], ANSWERS[1] + MESSAGES[2]]
    assert result.prefix.moved_tokens.tolist() == [p[0], MESSAGES[1] + 1, MESSAGES[2] + 1]
    turns = per_turn(result)
    assert turns[1].moved_kv_bytes == (MESSAGES[1] + 1) * toy.kv_bytes_per_token
    assert turns[2].hit_rate == pytest.approx(p[1] / p[2])
    assert turns[2].oracle_hit_rate == pytest.approx((p[1] + ANSWERS[1] - 1) / p[2])  # the answer's KV was elsewhere


def test_a_follow_up_arrives_its_think_time_after_the_previous_answer():
    toy = make_profile()
    result = simulate(ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, toy)), one_conversation(think_s=3.0))
    arrival, finish = result.workload.arrival_s, result.finish_s
    np.testing.assert_allclose(arrival, [3.0, finish[0] + 3.0, finish[1] + 3.0])
    assert (result.first_token_s > arrival).all()


def test_eviction_under_a_small_cache_loses_the_hit():
    """Two conversations take turns on one worker. With room for both contexts every follow-up hits; with room for
    one, each turn's admission evicts the other conversation's context (least recently used) and every follow-up is
    computed whole."""
    conversations = [[(300, 10, 0.0), (30, 10, 5.0)], [(300, 10, 1.0), (30, 10, 5.0)]]
    computed = {}
    for capacity in (100_000, 500):
        cluster = ClusterSpec("colocated", PoolSpec(1, make_profile(kv_capacity=capacity)))
        computed[capacity] = [t.computed_tokens for t in per_turn(simulate(cluster, multiturn(conversations)))]
    assert computed[100_000] == [300, 31]
    assert computed[500] == [300, 340]


def test_cache_aware_keeps_a_conversation_on_its_workers_and_round_robin_moves_it():
    toy = make_profile()
    moved, computed = {}, {}
    for policy in ("cache_aware", "round_robin"):
        # Every turn split (local_prefill_max_tokens 0): the placement on both pools is what is tested.
        cluster = ClusterSpec(
            "disaggregated", PoolSpec(2, toy), PoolSpec(2, toy), policy=policy, local_prefill_max_tokens=0
        )
        result = simulate(cluster, one_conversation())
        assert result.prefix is not None
        moved[policy] = result.prefix.moved_tokens.tolist()
        computed[policy] = [t.computed_tokens for t in per_turn(result)]
    p = prompts()
    assert moved["cache_aware"] == [p[0], MESSAGES[1] + 1, MESSAGES[2] + 1]
    assert computed["cache_aware"] == [p[0], ANSWERS[0] + MESSAGES[1], ANSWERS[1] + MESSAGES[2]]
    # Round robin alternates workers: turn 1 finds nothing; turn 2 is back where turn 0 ran, which holds turn 0's
    # prompt (prefill) and context (decode) only.
    assert moved["round_robin"] == [p[0], p[1], p[2] - (p[0] + ANSWERS[0] - 1)]
    assert computed["round_robin"] == [p[0], p[1], p[2] - p[0]]


@pytest.mark.parametrize("policy", ["cache_aware", "jsq"])
def test_a_short_follow_up_is_prefilled_alone_on_the_decode_worker_holding_its_context(policy):
    """Under cache_aware, a turn with at most local_prefill_max_tokens past what its decode worker holds (the
    message and the answer's last token) is prefilled there, in its steps: it computes those tokens and moves no KV.
    A longer one is split, and its prefill worker, which never saw the local turn, holds only the older prompt.
    jsq splits every turn (onto the same idle workers, so incremental transfer still applies)."""
    toy = make_profile()
    cluster = ClusterSpec(
        "disaggregated", PoolSpec(2, toy), PoolSpec(2, toy), policy=policy, local_prefill_max_tokens=MESSAGES[1] + 1
    )
    result = simulate(cluster, one_conversation())
    assert result.prefix is not None
    p = prompts()
    moved, computed = result.prefix.moved_tokens.tolist(), [t.computed_tokens for t in per_turn(result)]
    if policy == "jsq":
        assert moved == [p[0], MESSAGES[1] + 1, MESSAGES[2] + 1]
        assert computed == [p[0], ANSWERS[0] + MESSAGES[1], ANSWERS[1] + MESSAGES[2]]
        return
    assert moved == [p[0], 0, MESSAGES[2] + 1]
    assert computed == [p[0], MESSAGES[1] + 1, p[2] - p[0]]
    assert result.prefix.cached_tokens.tolist() == [0, p[0] + ANSWERS[0] - 1, p[0]]


def test_cache_aware_leaves_the_prefix_when_its_worker_is_loaded_beyond_what_it_saves():
    router = Router("cache_aware", 2)
    assert router.choose([400, 0], [500, 0]) == 0
    assert router.choose([1000, 0], [500, 0]) == 1
    assert router.choose([400, 0]) == 1  # nothing known of the prefix: jsq
    assert Router("cache_aware", 2, prefix_weight=3).choose([1000, 0], [500, 0]) == 0  # 1000 - 3 x 500 < 0
    assert Router("jsq", 2).choose([400, 0], [500, 0]) == 1


def test_the_cache_evicts_least_recently_used_first():
    cache = PrefixCache()
    cache.put(1, 100, room=1000)
    cache.put(2, 100, room=1000)
    cache.put(1, 150, room=1000)  # conversation 1 used again, and longer
    cache.evict_to(200)
    assert (cache.held(1), cache.held(2), cache.tokens) == (150, 0, 150)
    assert cache.take(1) == 150 and cache.tokens == 0 and cache.take(1) == 0


def test_without_incremental_transfer_every_turn_moves_its_whole_prompt():
    toy = make_profile()
    cluster = ClusterSpec("disaggregated", PoolSpec(1, toy), PoolSpec(1, toy), incremental_transfer=False)
    result = simulate(cluster, one_conversation())
    assert result.prefix is not None
    p = prompts()
    assert result.prefix.moved_tokens.tolist() == p
    assert result.prefix.cached_tokens.tolist() == [0, p[0], p[1]]  # prefill reuse is the same
