"""Scaling and role switching at the router level, deterministically: draining workers and the rebalance policy."""

from splitserve.cluster.router import PREFILL_BACKLOG_TOKENS, REBALANCE_WINDOW, Move, Router
from splitserve.config import RouterPolicy


def _router(prefill: int = 2, decode: int = 2, capacity: int = 10_000) -> Router:
    r = Router(RouterPolicy.jsq)
    for i in range(prefill):
        r.add_prefill_worker(f"p{i}", max_queue=1000)
    for i in range(decode):
        r.add_decode_worker(f"d{i}", capacity_tokens=capacity, max_queue=1000)
    return r


def test_a_draining_worker_gets_no_new_requests_but_keeps_its_own():
    r = _router()
    first = r.place(100, 10)
    r.set_draining(first.prefill_worker)
    r.set_draining(first.decode_worker)
    later = [r.place(10, 10) for _ in range(6)]
    assert {p.prefill_worker for p in later} == {"p0", "p1"} - {first.prefill_worker}
    assert {p.decode_worker for p in later} == {"d0", "d1"} - {first.decode_worker}
    assert r.loads()[first.decode_worker]["requests"] == 1  # its running request is still accounted
    assert r.loads()[first.decode_worker]["draining"] == 1.0


def _sample(r: Router, times: int) -> None:
    for _ in range(times):
        r.sample_balance()


def test_sustained_prefill_backlog_moves_a_decode_worker_to_prefill():
    r = _router(capacity=100_000)
    r.place(2 * PREFILL_BACKLOG_TOKENS, 1)  # one prompt that backs up a prefill worker, decode nearly idle
    r.place(2 * PREFILL_BACKLOG_TOKENS, 1)
    _sample(r, REBALANCE_WINDOW - 1)
    assert r.rebalance_move() is None  # not sustained for a whole window yet
    r.sample_balance()
    assert r.rebalance_move() == Move(source="decode", target="prefill")


def test_sustained_decode_pressure_moves_a_prefill_worker_to_decode():
    r = _router(capacity=1000)
    for _ in range(4):
        placement = r.place(10, 480)  # KV nearly full on both decode workers, prompts already prefilled
        placement.prefill_done()
    _sample(r, REBALANCE_WINDOW)
    assert r.rebalance_move() == Move(source="prefill", target="decode")


def test_one_balanced_sample_in_the_window_means_no_move():
    r = _router(capacity=100_000)
    placement = r.place(2 * PREFILL_BACKLOG_TOKENS, 1)
    _sample(r, REBALANCE_WINDOW - 1)
    placement.prefill_done()  # the burst is gone
    r.sample_balance()
    assert r.rebalance_move() is None


def test_the_last_worker_of_a_pool_is_never_moved():
    r = _router(prefill=2, decode=1, capacity=100_000)
    r.place(2 * PREFILL_BACKLOG_TOKENS, 1)
    r.place(2 * PREFILL_BACKLOG_TOKENS, 1)
    _sample(r, REBALANCE_WINDOW)
    assert r.rebalance_move() is None


def test_colocated_clusters_never_rebalance():
    r = _router(prefill=0, decode=2, capacity=100)
    r.place(10, 80)
    r.place(10, 80)
    _sample(r, REBALANCE_WINDOW)
    assert r.rebalance_move() is None
