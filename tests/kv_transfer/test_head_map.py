"""The links of a transfer between TP degrees: every KV head a decode rank holds comes once, from a prefill rank
that holds it, and replicated heads spread their sends over their holders."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.tensor_parallel import rank_kv_heads
from splitserve.kv_transfer.head_map import HeadLink, head_links, links_from, links_to

POWERS = st.sampled_from([1, 2, 4, 8])
# No deadline: a shared 2-core box can stall any example; the plans themselves take microseconds.
RELAXED = settings(deadline=None)


@RELAXED
@given(kv_heads=POWERS, src_tp=POWERS, dst_tp=POWERS)
def test_every_destination_head_comes_once_from_a_rank_that_holds_it(kv_heads, src_tp, dst_tp):
    links = head_links(kv_heads, src_tp, dst_tp)
    landed = Counter((link.dst_rank, head) for link in links for head in link.heads)
    wanted = {(rank, head) for rank in range(dst_tp) for head in rank_kv_heads(kv_heads, dst_tp, rank)}
    assert set(landed) == wanted
    assert set(landed.values()) == {1}
    for link in links:
        assert set(link.heads) <= set(rank_kv_heads(kv_heads, src_tp, link.src_rank))
        # The local slices pick the link's heads out of each end's pages.
        src = list(link.src_held)[link.src_slice or slice(None)]
        dst = list(link.dst_held)[link.dst_slice or slice(None)]
        assert src == dst == list(link.heads)


@RELAXED
@given(kv_heads=POWERS, src_tp=POWERS, dst_tp=POWERS)
def test_each_head_goes_once_per_receiving_rank_and_senders_share_replicated_heads(kv_heads, src_tp, dst_tp):
    links = head_links(kv_heads, src_tp, dst_tp)
    assert len({(link.src_rank, link.dst_rank) for link in links}) == len(links)  # one transfer per rank pair
    sends = Counter(link.src_rank for link in links)
    for head in range(kv_heads):
        holders = {r for r in range(src_tp) if head in rank_kv_heads(kv_heads, src_tp, r)}
        receivers = sum(head in rank_kv_heads(kv_heads, dst_tp, r) for r in range(dst_tp))
        used = {link.src_rank for link in links if head in link.heads}
        assert used <= holders
        assert len(used) == min(len(holders), receivers)  # replicas share the sends of their head
    assert max(sends.values()) - min(sends.get(r, 0) for r in range(src_tp)) <= max(1, dst_tp // src_tp)
    assert links == sorted(links, key=lambda link: (link.src_rank, link.dst_rank))
    assert [link for r in range(src_tp) for link in links_from(kv_heads, src_tp, dst_tp, r)] == links
    assert (
        sorted(
            (link for r in range(dst_tp) for link in links_to(kv_heads, src_tp, dst_tp, r)),
            key=lambda link: (link.src_rank, link.dst_rank),
        )
        == links
    )


@RELAXED
@given(kv_heads=POWERS, tp=POWERS)
def test_equal_degrees_link_each_rank_to_itself_with_all_its_heads(kv_heads, tp):
    links = head_links(kv_heads, tp, tp)
    assert [(link.src_rank, link.dst_rank) for link in links] == [(r, r) for r in range(tp)]
    assert all(link.src_slice is None and link.dst_slice is None for link in links)


def test_a_link_round_trips_the_wire_and_names_both_ends():
    (link, _) = head_links(8, 2, 4)[:2]
    assert HeadLink.from_wire(link.to_wire()) == link
    assert str(link) == "KV heads 0-1 of 8 from prefill rank 0/2 (holds 0-3) to decode rank 0/4 (holds 0-1)"
    assert link.src_slice == slice(0, 2) and link.dst_slice is None


@pytest.mark.parametrize(("kv_heads", "src_tp", "dst_tp", "side"), [(8, 3, 1, "prefill"), (6, 1, 4, "decode")])
def test_a_degree_that_cannot_hold_the_heads_names_its_side(kv_heads, src_tp, dst_tp, side):
    with pytest.raises(ValueError, match=f"{side} tensor_parallel_size"):
        head_links(kv_heads, src_tp, dst_tp)


def test_a_link_whose_heads_one_end_does_not_hold_is_refused():
    with pytest.raises(ValueError, match="not all on the decode rank, which holds 0-1"):
        HeadLink(8, 2, 0, 4, 0, range(2, 4))
