"""How to time one KV transfer through a real backend, shared by ``benchmarks/kv_transfer.py`` and
``splitserve profile``: a bare paged KV cache of the engine's layout on each side, moved layer by layer through
``make_sender`` / ``make_receiver`` exactly as a prefill worker hands a request to a decode worker."""

from __future__ import annotations

import time
from typing import Any

import torch

from splitserve.config import KVTransferConfig
from splitserve.engine import page_copy
from splitserve.kv_transfer import TransferSpec, make_receiver, make_sender

# The benchmark's default layout: one block-layer (K and V) is 64 KiB in bf16.
LAYERS, BLOCK, HEADS, DIM = 8, 16, 8, 128


class PagedKV(page_copy.PagedKVCache):
    """A bare KV cache of the engine's layout: ``layers`` x (K, V) x ``blocks`` pages of ``page`` (block, heads,
    head dim). ``sized`` picks the block count that holds ``mb`` MB for one request."""

    def __init__(self, layers: int, blocks: int, page: tuple[int, ...], dtype: torch.dtype, device: str):
        self.layers, self.blocks, self.page = layers, blocks, page
        self.kv_cache = torch.randn(layers, 2, blocks, *page, device=device).to(dtype)
        self.kv_layers = list(self.kv_cache.unbind(0))
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def sized(cls, mb: float, dtype: torch.dtype, device: str) -> PagedKV:
        block_layer = 2 * BLOCK * HEADS * DIM * dtype.itemsize
        return cls(LAYERS, max(1, round(mb * 1e6 / (block_layer * LAYERS))), (BLOCK, HEADS, DIM), dtype, device)

    @property
    def nbytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def spec(self, request_id: str) -> TransferSpec:
        return TransferSpec(
            request_id,
            self.layers,
            self.blocks * self.page[0],
            list(range(self.blocks)),
            (2, *self.page),
            str(self.dtype).removeprefix("torch."),
        )


def time_backend(backend: str, src: PagedKV, dst: PagedKV, repeats: int, **cfg: Any) -> float:
    """Seconds per transfer of all of ``src`` into ``dst`` (best of ``repeats``), including the layer-by-layer
    handoff. Best, not median: a transfer is only ever slowed by things outside it (scheduling, other traffic)."""
    config = KVTransferConfig(backend=backend, **cfg)
    receiver = make_receiver(config, dst)
    sender = make_sender(config, receiver.endpoint, src.device)
    best = float("inf")
    try:
        for i in range(repeats):
            spec = src.spec(f"bench-{i}")
            done = receiver.expect(spec)
            t0 = time.perf_counter()
            handle = sender.begin(spec)
            for layer in range(src.layers):
                handle.send_layer(layer, src.kv_layers[layer])
            handle.finish()
            done.result(timeout=300)
            if src.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    finally:
        sender.close()
        receiver.close()
    return best
