"""Test helpers: a KV cache of the engine's layout without a model: what both ends of a transfer touch."""

from __future__ import annotations

import torch

from splitserve.config import KVTransferConfig
from splitserve.engine.host_copy import index_tensor
from splitserve.kv_transfer import TransferResult, TransferSpec, make_receiver, make_sender


class FakeRunner:
    """The page API of ModelRunner over a bare [layers, 2, blocks, block_size, H, D] tensor."""

    def __init__(self, layers=3, blocks=16, block_size=4, heads=2, dim=8, dtype=torch.float32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.kv_cache = torch.randn(layers, 2, blocks, block_size, heads, dim, generator=gen).to(dtype)
        self.kv_layers = list(self.kv_cache.unbind(0))
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.num_layers = layers

    @property
    def page_shape(self):
        return (2, *self.kv_cache.shape[3:])

    def block_index(self, block_ids):
        return index_tensor(block_ids, self.kv_cache.device)

    def _index(self, block_ids):
        return block_ids if isinstance(block_ids, torch.Tensor) else self.block_index(block_ids)

    def gather_pages(self, layer, block_ids):
        return self.kv_layers[layer].index_select(1, self._index(block_ids))

    def scatter_layers(self, first, block_ids, pages):
        self.kv_cache[first : first + len(pages)].index_copy_(2, self._index(block_ids), pages.to(self.kv_cache))

    def spec(self, request_id, block_ids, checksum=False):
        return TransferSpec(
            request_id=request_id,
            num_layers=self.num_layers,
            num_tokens=len(block_ids) * self.kv_cache.shape[3],
            dst_block_ids=list(block_ids),
            page_shape=self.page_shape,
            dtype=str(self.dtype).removeprefix("torch."),
            checksum=checksum,
        )


def send_all(handle, src, src_blocks, layers=None):
    for layer in layers if layers is not None else range(src.num_layers):
        handle.send_layer(layer, src.gather_pages(layer, src_blocks))


def pages_equal(src, src_blocks, dst, dst_blocks):
    return all(
        torch.equal(src.gather_pages(i, src_blocks).cpu(), dst.gather_pages(i, dst_blocks).cpu())
        for i in range(src.num_layers)
    )


def transfer(
    cfg: KVTransferConfig, src, dst, src_blocks, dst_blocks, device: str | None = None
) -> tuple[int, TransferResult]:
    """``src_blocks`` of the source into ``dst_blocks`` of the destination through a receiver opened for it: the
    bytes sent and the receiver's result."""
    receiver = make_receiver(cfg, dst)
    try:
        done = receiver.expect(dst.spec("r1", dst_blocks))
        handle = make_sender(cfg, receiver.endpoint, device).begin(src.spec("r1", dst_blocks))
        send_all(handle, src, src_blocks)
        sent = handle.finish()
        return sent, done.result(timeout=10)
    finally:
        receiver.close()
