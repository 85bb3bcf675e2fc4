"""A request's KV between workers of different TP degrees, in one process over the real backends: one transfer per
link, each landing its KV heads in the head slice of the reserved blocks; the request is done only once every link
landed, fails as soon as one fails, and a sender whose head layout differs is refused naming both layouts."""

from __future__ import annotations

import pytest
import torch

from splitserve.bench.kv_timing import PagedKV
from splitserve.config import KVTransferConfig
from splitserve.engine.page_copy import gather_pages, scatter_pages
from splitserve.engine.tensor_parallel import rank_kv_heads
from splitserve.kv_transfer import IntegrityError, TransferAborted, TransferSpec, make_receiver, make_sender
from splitserve.kv_transfer.head_map import HeadLink, links_from, links_to
from splitserve.kv_transfer.rank_send import LinkSends

pytestmark = pytest.mark.timeout(120)

LAYERS, BLOCK, DIM, KV_HEADS = 3, 4, 8, 4
SRC_BLOCKS, DST_BLOCKS = [0, 2, 3], [6, 1, 4]


def _rank_cache(tp: int, rank: int, seed: int) -> PagedKV:
    torch.manual_seed(seed)
    return PagedKV(LAYERS, 8, (BLOCK, len(rank_kv_heads(KV_HEADS, tp, rank)), DIM), torch.float32, "cpu")


@pytest.fixture
def opened():
    """Receivers and senders a test opens, closed after it."""
    things: list = []
    yield things
    for thing in reversed(things):
        thing.close()


def _open(opened: list, thing):
    opened.append(thing)
    return thing


def _spec(request_id: str, link: HeadLink, blocks: list[int]) -> TransferSpec:
    return TransferSpec(
        request_id, LAYERS, len(blocks) * BLOCK, blocks, (2, BLOCK, len(link.heads), DIM), "float32", link=link
    )


def test_a_head_slice_is_gathered_contiguous_and_scattered_into_its_heads_only():
    cache = torch.randn(2, 8, BLOCK, KV_HEADS, DIM)
    for blocks in (torch.tensor([5, 1, 3]), slice(2, 5)):
        pages = gather_pages(cache, blocks, slice(1, 3))
        assert pages.is_contiguous() and pages.shape == (2, 3, BLOCK, 2, DIM)
        assert torch.equal(pages, cache[:, [5, 1, 3] if isinstance(blocks, torch.Tensor) else blocks][..., 1:3, :])
        into = torch.zeros_like(cache)
        scatter_pages(into, blocks, pages, slice(1, 3))
        assert torch.equal(gather_pages(into, blocks, slice(1, 3)), pages)
        assert into[..., [0, 3], :].abs().sum() == 0  # the other heads untouched


@pytest.mark.parametrize("backend", ["local", "tcp"])
@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2), (4, 2)])
def test_each_decode_rank_lands_its_heads_from_the_prefill_ranks_and_completes_after_the_last_link(
    opened, backend, src_tp, dst_tp
):
    config = KVTransferConfig(backend=backend)
    sources = [_rank_cache(src_tp, r, seed=r) for r in range(src_tp)]
    sinks = [_rank_cache(dst_tp, r, seed=100 + r) for r in range(dst_tp)]
    receivers = [_open(opened, make_receiver(config, sink)) for sink in sinks]
    senders = [_open(opened, make_sender(config, receiver.endpoint)) for receiver in receivers]
    done = [
        receivers[r].expect_links([_spec("req", link, DST_BLOCKS) for link in links_to(KV_HEADS, src_tp, dst_tp, r)])
        for r in range(dst_tp)
    ]
    for src in range(src_tp):
        links = links_from(KV_HEADS, src_tp, dst_tp, src)
        handles = [(link, senders[link.dst_rank].begin(_spec("req", link, DST_BLOCKS))) for link in links]
        sends = LinkSends(sources[src], SRC_BLOCKS, handles)
        for layer in range(LAYERS):
            sends.send_layer(layer)
        assert sends.finish() == LAYERS * sum(len(link.heads) for link in links) * 2 * 3 * BLOCK * DIM * 4
        if src < src_tp - 1:  # decode ranks still missing a link are not done
            waiting = {
                link.dst_rank for s in range(src + 1, src_tp) for link in links_from(KV_HEADS, src_tp, dst_tp, s)
            }
            assert all(not done[r].done() for r in waiting)
    for r in range(dst_tp):
        assert done[r].result(timeout=30).bytes > 0
        for link in links_to(KV_HEADS, src_tp, dst_tp, r):
            for layer in range(LAYERS):
                sent = sources[link.src_rank].gather_pages(layer, SRC_BLOCKS, link.src_slice)
                assert torch.equal(sinks[r].gather_pages(layer, DST_BLOCKS, link.dst_slice), sent)


@pytest.mark.parametrize("backend", ["local", "tcp"])
def test_a_sender_with_another_head_layout_is_refused_naming_both(opened, backend):
    """The decode worker plans for a tp=2 prefill worker; the sender is a tp=1 one."""
    config = KVTransferConfig(backend=backend)
    receiver = _open(opened, make_receiver(config, _rank_cache(1, 0, seed=1)))
    done = receiver.expect_links([_spec("req", link, DST_BLOCKS) for link in links_to(KV_HEADS, 2, 1, 0)])
    (link,) = links_from(KV_HEADS, 1, 1, 0)
    handle = _open(opened, make_sender(config, receiver.endpoint)).begin(_spec("req", link, DST_BLOCKS))
    for layer in range(LAYERS):
        handle.send_layer(layer, _rank_cache(1, 0, seed=2).gather_pages(layer, SRC_BLOCKS))
    with pytest.raises(IntegrityError) as sent:
        handle.finish()
    with pytest.raises(IntegrityError) as expected:
        done.result(timeout=30)
    for message in (str(sent.value), str(expected.value)):
        assert "KV heads 0-3 of 4 from prefill rank 0/1 (holds 0-3) to decode rank 0/1" in message  # the sender's
        assert "KV heads 0-1 of 4 from prefill rank 0/2 (holds 0-1)" in message  # and the receiver's two links
        assert "KV heads 2-3 of 4 from prefill rank 1/2" in message
    assert receiver.pending == 0 and receiver.unwritten("req").done()


def test_a_failed_link_fails_the_request_and_aborts_the_other_links(opened):
    """p=2 -> d=1 over tcp: prefill rank 1 aborts; rank 0's transfer, under way, is told, and a later one of the
    request's links is told it was aborted."""
    config = KVTransferConfig(backend="tcp")
    receiver = _open(opened, make_receiver(config, _rank_cache(1, 0, seed=1)))
    sources = [_rank_cache(2, r, seed=r) for r in range(2)]
    done = receiver.expect_links([_spec("req", link, DST_BLOCKS) for link in links_to(KV_HEADS, 2, 1, 0)])
    first, second = links_to(KV_HEADS, 2, 1, 0)
    sender = _open(opened, make_sender(config, receiver.endpoint))
    under_way = sender.begin(_spec("req", first, DST_BLOCKS))
    under_way.send_layer(0, sources[0].gather_pages(0, SRC_BLOCKS))
    failing = sender.begin(_spec("req", second, DST_BLOCKS))
    failing.send_layer(0, sources[1].gather_pages(0, SRC_BLOCKS))
    failing.abort("prefill rank 1 failed")
    with pytest.raises(TransferAborted, match="prefill rank 1 failed"):
        done.result(timeout=30)
    with pytest.raises(TransferAborted):  # why, if the receiver had claimed it before the abort, else just that
        under_way.finish()
    receiver.unwritten("req").result(timeout=30)
    assert receiver.pending == 0
    late = sender.begin(_spec("req", second, DST_BLOCKS))
    with pytest.raises(TransferAborted, match="prefill rank 1 failed"):
        late.finish()
