"""The router's decisions, deterministically: no Ray, just its own load accounting."""

import pytest

from splitserve.cluster.messages import ErrorCode, ServingError
from splitserve.cluster.router import PREFILL_BACKLOG_TOKENS, Placement, Router
from splitserve.config import RouterPolicy


def _router(policy: RouterPolicy, prefill: int = 2, decode: int = 2, capacity: int = 100_000) -> Router:
    r = Router(policy)
    for i in range(prefill):
        r.add_prefill_worker(f"p{i}", max_queue=1000)
    for i in range(decode):
        r.add_decode_worker(f"d{i}", capacity_tokens=capacity, max_queue=1000)
    return r


def _skewed_backlog(policy: RouterPolicy) -> int:
    """Alternating long and short prompts, none finished yet: the worst prefill backlog the policy builds."""
    r = _router(policy)
    for i in range(40):
        r.place(prompt_tokens=4000 if i % 2 == 0 else 50, max_tokens=16)
    return max(load["pending_tokens"] for load in r.loads().values())


def test_jsq_beats_round_robin_on_a_skewed_load():
    rr, jsq = _skewed_backlog(RouterPolicy.round_robin), _skewed_backlog(RouterPolicy.jsq)
    assert rr == 20 * 4000  # round-robin sends every long prompt to the same worker
    assert jsq <= 11 * 4000  # join-shortest-queue splits them
    assert jsq < 0.6 * rr


def test_decode_placement_follows_kv_occupancy():
    r = _router(RouterPolicy.jsq, prefill=1, decode=2, capacity=10_000)
    first = r.place(prompt_tokens=3000, max_tokens=1000)
    second = r.place(prompt_tokens=10, max_tokens=10)
    assert first.decode_worker != second.decode_worker
    first.release()
    assert r.place(prompt_tokens=10, max_tokens=10).decode_worker == first.decode_worker


def test_unhealthy_and_excluded_workers_are_skipped():
    r = _router(RouterPolicy.jsq)
    r.set_healthy("d0", False)
    assert all(r.place(10, 10).decode_worker == "d1" for _ in range(5))
    with pytest.raises(ServingError) as info:
        r.place(10, 10, exclude=frozenset({"d1"}))
    assert info.value.code == ErrorCode.UNAVAILABLE


def test_full_queues_mean_resource_exhausted():
    r = Router(RouterPolicy.jsq)
    r.add_prefill_worker("p0", max_queue=1)
    r.add_decode_worker("d0", capacity_tokens=1000, max_queue=5)
    queued = r.place(10, 10)
    with pytest.raises(ServingError) as info:
        r.place(10, 10)
    assert info.value.code == ErrorCode.RESOURCE_EXHAUSTED
    queued.prefill_done()
    assert r.place(10, 10).prefill_worker == "p0"


def _booked(r: Router) -> dict[str, tuple[float, float, float]]:
    return {w: (load["pending_tokens"], load["held_tokens"], load["requests"]) for w, load in r.loads().items()}


@pytest.mark.parametrize("first_token", [False, True])
def test_a_placement_released_twice_books_back_once(first_token):
    r = _router(RouterPolicy.jsq, prefill=1, decode=1)
    kept = r.place(100, 20)
    booked = _booked(r)
    placement = r.place(30, 10)
    if first_token:
        placement.prefill_done()
        placement.prefill_done()
    placement.release()
    placement.release()
    assert _booked(r) == booked  # only the other request's booking is left
    kept.release()
    assert _booked(r) == {"p0": (0, 0, 0), "d0": (0, 0, 0)}


def test_a_placement_on_a_replaced_worker_leaves_the_new_one_alone():
    r = _router(RouterPolicy.jsq, prefill=1, decode=1)
    placement = r.place(30, 10)
    r.remove_worker("d0")
    r.add_decode_worker("d0", capacity_tokens=10_000, max_queue=8)  # restarted under the same id
    r.place(5, 5)
    placement.release()
    assert _booked(r)["d0"] == (0, 10, 1)  # the fresh request's booking only


def test_borrow_idle_lets_an_idle_decode_worker_prefill():
    r = _router(RouterPolicy.borrow_idle, prefill=1, decode=1)
    assert r.place(PREFILL_BACKLOG_TOKENS, 16).prefill_worker == "p0"
    # The prefill worker is now backed up and the decode worker nearly idle: the decode worker takes the prompt.
    assert r.place(100, 16).prefill_worker is None
    jsq = _router(RouterPolicy.jsq, prefill=1, decode=1)
    jsq.place(PREFILL_BACKLOG_TOKENS, 16)
    assert jsq.place(100, 16).prefill_worker == "p0"


def _with_hybrid_worker(policy: RouterPolicy, prefill_queue: int = 1000) -> Router:
    r = Router(policy)
    r.add_prefill_worker("p0", max_queue=prefill_queue)
    r.add_decode_worker("d0", capacity_tokens=100_000, max_queue=1000)
    r.add_decode_worker("m0", capacity_tokens=100_000, max_queue=1000, hybrid=True)
    return r


@pytest.mark.parametrize("policy", [RouterPolicy.jsq, RouterPolicy.round_robin, RouterPolicy.borrow_idle])
def test_a_hybrid_worker_takes_the_prompts_of_a_backed_up_prefill_pool(policy):
    r = _with_hybrid_worker(policy)
    first = r.place(PREFILL_BACKLOG_TOKENS, 16)
    assert first.prefill_worker == "p0"
    # Prefill is backed up: the hybrid worker runs the whole request, under every policy, before any idle decode
    # worker would (borrow_idle's fallback).
    assert r.place(100, 16) == Placement(None, "m0")
    first.prefill_done()
    assert r.place(100, 16).prefill_worker == "p0"


def test_a_hybrid_worker_decodes_like_the_others_and_takes_refused_prompts():
    r = _with_hybrid_worker(RouterPolicy.jsq, prefill_queue=2)
    assert r.place(10, 10) == Placement("p0", "d0")
    assert r.place(10, 10) == Placement("p0", "m0")  # a transferred request, decoded on the hybrid worker
    # p0's queue is full now: the hybrid worker takes the request itself instead of a refusal.
    assert r.place(10, 10) == Placement(None, "m0")


def test_without_room_on_a_hybrid_worker_the_request_waits_for_prefill():
    r = Router(RouterPolicy.jsq)
    r.add_prefill_worker("p0", max_queue=1000)
    r.add_decode_worker("m0", capacity_tokens=100_000, max_queue=1, hybrid=True)
    r.add_decode_worker("d0", capacity_tokens=100_000, max_queue=1000)
    r.place(PREFILL_BACKLOG_TOKENS, 16)  # backs prefill up; decoded on m0 or d0
    r.place(PREFILL_BACKLOG_TOKENS, 16)
    placement = r.place(100, 16)
    assert placement.prefill_worker == "p0" and placement.decode_worker == "d0"
