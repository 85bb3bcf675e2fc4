"""Links of a transfer between TP degrees over the GPU backends: each prefill rank a process of its own, sending its
links' head slices to decode ranks' receivers in this process. cuda_ipc writes a link's heads into the receiver's
cache itself; nccl lands them from its staging buffer. Skipped without CUDA (nccl: without two GPUs)."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from splitserve.bench.kv_timing import PagedKV
from splitserve.config import KVTransferConfig
from splitserve.engine.tensor_parallel import rank_kv_heads
from splitserve.kv_transfer import TransferSpec, make_receiver, make_sender
from splitserve.kv_transfer.head_map import HeadLink, links_from, links_to
from splitserve.kv_transfer.rank_send import LinkSends

pytestmark = pytest.mark.gpu
LAYERS, BLOCKS, BLOCK, DIM, KV_HEADS = 3, 16, 16, 64, 4
SRC_BLOCKS, DST_BLOCKS = [0, 2, 3, 7], [9, 1, 4, 5]


def _rank_cache(tp: int, rank: int, seed: int, device: str) -> PagedKV:
    torch.manual_seed(seed)
    heads = len(rank_kv_heads(KV_HEADS, tp, rank))
    return PagedKV(LAYERS, BLOCKS, (BLOCK, heads, DIM), torch.bfloat16, device)


def _spec(link: HeadLink) -> TransferSpec:
    page = (2, BLOCK, len(link.heads), DIM)
    return TransferSpec("tp", LAYERS, len(DST_BLOCKS) * BLOCK, DST_BLOCKS, page, "bfloat16", link=link)


def _send_rank(backend: str, src_tp: int, dst_tp: int, rank: int, endpoints, device: str, results) -> None:
    """Child process: prefill rank ``rank`` of ``src_tp`` sends its links."""
    torch.cuda.set_device(torch.device(device))
    src = _rank_cache(src_tp, rank, seed=rank, device=device)
    config = KVTransferConfig(backend=backend, timeout_s=30)
    links = links_from(KV_HEADS, src_tp, dst_tp, rank)
    senders = [make_sender(config, endpoints[link.dst_rank], device) for link in links]
    handles = [sender.begin(_spec(link)) for link, sender in zip(links, senders, strict=True)]
    sends = LinkSends(src, src.block_index(SRC_BLOCKS), list(zip(links, handles, strict=True)))
    for layer in range(LAYERS):
        sends.send_layer(layer)
    results.put(sends.finish())
    for sender in senders:
        sender.close()


def _links_land(backend: str, src_tp: int, dst_tp: int, src_device: str, dst_device: str) -> None:
    sinks = [_rank_cache(dst_tp, r, seed=100 + r, device=dst_device) for r in range(dst_tp)]
    receivers = [make_receiver(KVTransferConfig(backend=backend, timeout_s=30), sink) for sink in sinks]
    try:
        done = [
            receiver.expect_links([_spec(link) for link in links_to(KV_HEADS, src_tp, dst_tp, r)])
            for r, receiver in enumerate(receivers)
        ]
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        endpoints = [receiver.endpoint for receiver in receivers]
        children = [
            ctx.Process(target=_send_rank, args=(backend, src_tp, dst_tp, r, endpoints, src_device, results))
            for r in range(src_tp)
        ]
        for child in children:
            child.start()
        assert all(results.get(timeout=120) > 0 for _ in children)
        for child in children:
            child.join(timeout=30)
        for future in done:
            assert future.result(timeout=30).backend == backend
    finally:
        for receiver in receivers:
            receiver.close()
    for r, sink in enumerate(sinks):
        for link in links_to(KV_HEADS, src_tp, dst_tp, r):
            src = _rank_cache(src_tp, link.src_rank, seed=link.src_rank, device=src_device)
            for layer in range(LAYERS):
                sent = src.gather_pages(layer, SRC_BLOCKS, link.src_slice).to(dst_device)
                assert torch.equal(sink.gather_pages(layer, DST_BLOCKS, link.dst_slice), sent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2), (2, 4)])
def test_links_land_their_head_slices_over_cuda_ipc(src_tp, dst_tp):
    _links_land("cuda_ipc", src_tp, dst_tp, "cuda:0", "cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2)])
def test_links_land_their_head_slices_over_nccl(src_tp, dst_tp):
    _links_land("nccl", src_tp, dst_tp, "cuda:1", "cuda:0")
