"""The router's prefix index and the ``cache_aware`` policy, deterministically: real block managers publish their
cache events, the index mirrors them, the router places by them. No Ray."""

import random

import pytest

from splitserve.cluster.prefix_index import PrefixIndex
from splitserve.cluster.router import Router
from splitserve.config import RouterPolicy
from splitserve.engine.block_manager import BlockManager, CacheEvents, OutOfBlocks, prefix_block_hashes

BS = 4


def _engine_reuse(bm: BlockManager, prompt: list[int]) -> int:
    """What the engine itself would reuse of ``prompt`` now (allocated and given back at once)."""
    table, cached = bm.allocate_prompt(prompt)
    bm.free(table)
    return cached


def test_events_name_the_blocks_stored_and_evicted():
    bm = BlockManager(num_blocks=4, block_size=BS, record_events=True)
    prompt = list(range(10))  # two full blocks and a partial one
    table, _ = bm.allocate_prompt(prompt)
    bm.commit_full_blocks(table, prompt)
    events = bm.take_events()
    assert events == CacheEvents(stored=list(prefix_block_hashes(prompt, BS)), removed=[])
    assert bm.take_events() is None  # taken once
    bm.free(table)
    assert bm.take_events() is None  # freed blocks stay cached
    bm.allocate(4)  # takes every block, the cached ones too
    evicted = bm.take_events()
    assert evicted is not None and not evicted.stored and sorted(evicted.removed) == sorted(events.stored)


def test_the_index_mirrors_what_the_engine_would_reuse():
    """Under random traffic with evictions, the index (fed only by events) answers exactly what each engine reuses."""
    rng = random.Random(1)
    engines = {w: BlockManager(num_blocks=24, block_size=BS, record_events=True) for w in ("a", "b")}
    index = PrefixIndex()
    for w in engines:
        index.add_worker(w, BS)
    stems = [[rng.randrange(50) for _ in range(rng.randint(4, 30))] for _ in range(6)]
    live: list[tuple[str, list[int]]] = []
    hits, evicted = 0, 0

    def publish(worker: str) -> None:
        nonlocal evicted
        events = engines[worker].take_events()
        if events is not None:
            evicted += len(events.removed)
            index.apply(worker, events)

    for _ in range(600):
        w = rng.choice("ab")
        bm = engines[w]
        if live and (rng.random() < 0.4 or bm.num_free < 10):
            owner, table = live.pop(rng.randrange(len(live)))
            engines[owner].free(table)
            continue
        prompt = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randint(1, 12))]
        try:
            table, _ = bm.allocate_prompt(prompt)
        except OutOfBlocks:
            continue
        bm.commit_full_blocks(table, prompt)
        live.append((w, table))
        publish(w)
        probe = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randint(0, 8))]
        for v, other in engines.items():
            publish(v)
            if other.num_free >= other.blocks_for(len(probe)):
                cached = index.cached_tokens(probe, [v])[v]
                assert cached == _engine_reuse(other, probe)
                hits += cached > 0
                publish(v)  # the probe's own allocation may have evicted blocks
    assert hits > 100 and evicted > 100  # both paths were exercised


def test_lost_and_stray_events_only_misinform():
    index = PrefixIndex()
    index.add_worker("a", BS)
    prompt = list(range(13))
    hashes = list(prefix_block_hashes(prompt, BS))
    index.apply("gone", CacheEvents(stored=hashes, removed=[]))  # a worker the router no longer has: ignored
    index.apply("a", CacheEvents(stored=[], removed=hashes))  # eviction of blocks it never heard of: no-op
    assert index.cached_tokens(prompt, ["a", "gone"]) == {"a": 0, "gone": 0}
    index.apply("a", CacheEvents(stored=hashes[1:], removed=[]))  # the first block's event was lost
    assert index.cached_tokens(prompt, ["a"]) == {"a": 0}  # a chain is matched from its start only
    index.apply("a", CacheEvents(stored=hashes[:1], removed=[]))
    assert index.cached_tokens(prompt, ["a"]) == {"a": 12}  # the last token's block is never counted as reusable
    assert index.cached_tokens(prompt[:12], ["a"]) == {"a": 8}


def _router(policy=RouterPolicy.cache_aware, **kwargs) -> Router:
    r = Router(policy, **kwargs)
    for w in ("p0", "p1"):
        r.add_prefill_worker(w, max_queue=100, block_size=BS)
    for w in ("d0", "d1"):
        r.add_decode_worker(w, capacity_tokens=10_000, max_queue=100, block_size=BS)
    return r


def _holds(r: Router, worker: str, prompt: list[int]) -> None:
    r.cache_events(worker, CacheEvents(stored=list(prefix_block_hashes(prompt, BS)), removed=[]))


def test_cache_aware_follows_the_prefix_until_the_load_outweighs_it():
    r = _router(local_prefill_max_tokens=0)  # every request split, as its prefill side is what is tested
    context = list(range(400))
    turn = [*context, 7, 8, 9]
    _holds(r, "p1", context)
    _holds(r, "d1", context)
    placed = r.place(len(turn), 16, prompt=turn)
    assert (placed.prefill_worker, placed.decode_worker) == ("p1", "d1")
    # Only the uncached tokens are booked on the prefill worker: what it computes.
    assert r.loads()["p1"]["pending_tokens"] == len(turn) - 400
    placed.release()
    # A backlog on p1 beyond what its cache saves (400 tokens) sends the prompt elsewhere; below it, not.
    backlog = r.place(390, 1, prompt=list(range(1000, 1390)), exclude=frozenset({"p0"}))
    assert r.place(len(turn), 16, prompt=turn).prefill_worker == "p1"
    backlog.release()
    r.place(800, 1, prompt=list(range(2000, 2800)), exclude=frozenset({"p0"}))
    assert r.place(len(turn), 16, prompt=turn).prefill_worker == "p0"


def test_decode_prefix_weight_scales_what_a_cached_token_is_worth():
    for weight, expected in ((1.0, "d0"), (30.0, "d1")):
        r = _router(decode_prefix_weight=weight)
        _holds(r, "d1", list(range(100)))
        r.place(1000, 1000, prompt=list(range(5000, 6000)), exclude=frozenset({"d0"}))  # d1: 2000 tokens held
        turn = list(range(101))
        # d1's cost: (2000 - weight * 100) / capacity vs d0's 0: only a heavy weight outweighs its load.
        assert r.place(len(turn), 10, prompt=turn).decode_worker == expected


def test_a_short_uncached_suffix_runs_on_the_decode_worker_holding_the_prefix():
    r = _router(local_prefill_max_tokens=16)
    context = list(range(400))
    _holds(r, "p1", context)
    _holds(r, "d1", context)
    turn = [*context, *range(1000, 1010)]  # 10 tokens past the cached 400
    placed = r.place(len(turn), 16, prompt=turn, session_id="chat")
    # d1 runs it alone: no prefill worker, no prompt booked on any, only the decode worker's KV.
    assert (placed.prefill_worker, placed.decode_worker) == (None, "d1")
    loads = r.loads()
    assert [loads[w]["pending_tokens"] for w in ("p0", "p1")] == [0, 0]
    assert [loads[w]["requests"] for w in ("p0", "p1", "d0", "d1")] == [0, 0, 0, 1]
    assert loads["d1"]["held_tokens"] == len(turn) + 16
    placed.release()
    assert r.loads()["d1"]["held_tokens"] == 0 and r.loads()["d1"]["requests"] == 0
    # A longer suffix is split, its prompt going to the prefill worker holding the most of it.
    longer = [*context, *range(1000, 1020)]
    placed = r.place(len(longer), 16, prompt=longer, session_id="chat")
    assert (placed.prefill_worker, placed.decode_worker) == ("p1", "d1")
    assert r.loads()["p1"]["pending_tokens"] == 20


def test_a_local_run_needs_a_cached_prefix_and_is_off_at_zero():
    short = list(range(10))
    assert _router(local_prefill_max_tokens=16).place(10, 4, prompt=short).prefill_worker is not None  # cold
    r = _router(local_prefill_max_tokens=0)
    _holds(r, "d1", list(range(400)))
    assert r.place(403, 4, prompt=list(range(403))).prefill_worker is not None


def test_the_local_run_weighs_in_the_decode_choice():
    """A worker that can run the request alone counts the whole prompt as KV not moved: it wins over a lighter one
    that the cached prefix alone would not outweigh."""
    context = list(range(96))
    turn = [*context, *range(1000, 1008)]
    for local_max, expected in ((0, "d0"), (16, "d1")):
        r = _router(decode_prefix_weight=1.0, local_prefill_max_tokens=local_max)
        _holds(r, "d1", context)
        r.place(100, 0, prompt=list(range(5000, 5100)), exclude=frozenset({"d0"}))  # d1: 100 tokens held
        # d1's cost: 100 - 96 cached > 0 (d0's); run alone, 100 - 104 < 0.
        assert r.place(len(turn), 4, prompt=turn).decode_worker == expected


def test_session_goes_back_to_its_worker_within_the_slack():
    r = _router(session_slack_tokens=100)
    first = r.place(50, 10, prompt=list(range(50)), session_id="chat")
    first.release()
    # Without cache events (late, or never sent) the hint alone keeps the session on its workers...
    p, d = first.prefill_worker, first.decode_worker
    other = "p1" if p == "p0" else "p0"
    load = r.place(80, 1, prompt=list(range(900, 980)), exclude=frozenset({other}))  # its prefill worker: 80 behind
    again = r.place(60, 10, prompt=list(range(60)), session_id="chat")
    assert (again.prefill_worker, again.decode_worker) == (p, d)
    again.release()
    # ...while the load it would take on stays within the slack; beyond it, the best worker wins.
    r.place(40, 1, prompt=list(range(700, 740)), exclude=frozenset({other}))  # now 120 behind
    assert r.place(60, 10, prompt=list(range(60)), session_id="chat").prefill_worker == other
    load.release()


def test_other_policies_ignore_the_index_and_sessions():
    r = _router(RouterPolicy.jsq, local_prefill_max_tokens=16)
    _holds(r, "p1", list(range(400)))
    _holds(r, "d1", list(range(400)))
    r.place(10, 1, prompt=list(range(500, 510)), exclude=frozenset({"p0", "d0"}))
    # Neither the prefix nor a short suffix counts: the least loaded workers, split.
    placed = r.place(401, 16, prompt=list(range(401)), session_id="s")
    assert (placed.prefill_worker, placed.decode_worker) == ("p0", "d0")


@pytest.mark.parametrize("pool", ["prefill", "decode"])
def test_a_removed_or_replaced_worker_forgets_its_cache(pool):
    r = _router()
    worker = "p1" if pool == "prefill" else "d1"
    _holds(r, worker, list(range(40)))
    assert r.prefix_index.blocks(worker) == 10
    r.remove_worker(worker)
    assert r.prefix_index.blocks(worker) == 0
    _holds(r, worker, list(range(40)))  # a stray event after removal
    if pool == "prefill":
        r.add_prefill_worker(worker, max_queue=100, block_size=BS)
    else:
        r.add_decode_worker(worker, capacity_tokens=10_000, max_queue=100, block_size=BS)
    assert r.prefix_index.blocks(worker) == 0
