"""Gathering and scattering one layer's KV pages at copy speed.

``index_select`` / ``index_copy_`` move one element per thread: on bf16 pages that runs at about half the device's
copy rate (H100, 67 MB of 8B-model pages: 530 vs 1130 GB/s). Viewed as int64 words the same kernels move 8 bytes
per element and reach ~90% of it. The pages are opaque bytes here, so the view changes nothing else.

A request's blocks are often one consecutive run (a fresh allocator hands them out in order): those are selected by
a slice and moved by a plain copy, which skips the index kernel and its longer launch; one layer of a 256 MB
transfer is small enough on an H200 that the launch, not the copy, sets the rate.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from splitserve.engine.host_copy import index_tensor

# Which blocks of a layer: a consecutive run as a slice, any other set as an index tensor on the cache's device.
Blocks = torch.Tensor | slice


def select_blocks(ids: list[int] | Blocks, device: torch.device) -> Blocks:
    """Build once per transfer, not per layer; an index is copied to the device without a host sync."""
    if not isinstance(ids, list):
        return ids
    if ids and all(b == a + 1 for a, b in pairwise(ids)):
        return slice(ids[0], ids[-1] + 1)
    return index_tensor(ids, device)


def _words(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` viewed as int64 words along its last dimension, or None where its layout does not allow it."""
    if t.element_size() >= 8:
        return None
    try:
        return t.view(torch.int64)
    except RuntimeError:  # last dim not contiguous, or a size/stride/offset not a whole number of words
        return None


# The block and head axes, counted from the end, of a layer's cache [2, blocks, block, heads, dim] and of a run of
# layers [layers, 2, blocks, ...] alike (the int64 view keeps the number of dimensions).
_BLOCKS = -4
_HEADS = -2


def _heads_of(cache: torch.Tensor, heads: slice | None) -> torch.Tensor:
    """The view of ``heads`` of a cache (a transfer between TP degrees moves some of a rank's KV heads)."""
    return cache if heads is None else cache.narrow(_HEADS, heads.start, heads.stop - heads.start)


def gather_pages(cache: torch.Tensor, blocks: Blocks, heads: slice | None = None) -> torch.Tensor:
    """A contiguous copy of ``blocks`` of one layer's cache, or of a run of layers; of KV heads ``heads`` only, if
    given (still one copy: the head slice is a view)."""
    cache = _heads_of(cache, heads)
    words = _words(cache)
    source = cache if words is None else words
    if isinstance(blocks, slice):
        run = source.narrow(_BLOCKS, blocks.start, blocks.stop - blocks.start)
        picked = run.clone(memory_format=torch.contiguous_format)  # a copy even when the run is a whole layer
    else:
        picked = source.index_select(_BLOCKS, blocks)
    return picked if words is None else picked.view(cache.dtype)


def scatter_pages(cache: torch.Tensor, blocks: Blocks, pages: torch.Tensor, heads: slice | None = None) -> None:
    """Write ``pages`` into ``blocks`` of one layer's cache, or of a run of layers (same dtype and device; ``pages``
    has the cache's shape with as many blocks as ``blocks`` selects), into KV heads ``heads`` only, if given."""
    cache = _heads_of(cache, heads)
    dst, src = _words(cache), _words(pages)
    if dst is None or src is None:
        dst, src = cache, pages
    if isinstance(blocks, slice):
        run = dst.narrow(_BLOCKS, blocks.start, blocks.stop - blocks.start)
        if run.shape != src.shape:  # copy_ would broadcast where index_copy_ refuses
            raise ValueError(f"pages {tuple(pages.shape)} do not fill blocks {blocks} of a cache {tuple(cache.shape)}")
        run.copy_(src)
    else:
        dst.index_copy_(_BLOCKS, blocks, src)


class PagedKVCache:
    """Block-wise access to a KV cache ``[layers, 2, blocks, block_size, kv_heads, head_dim]`` for the transfer
    layer, whose senders read pages from it and whose receivers land pages in it: the engine's runner, or a
    benchmark's bare cache. The class sets ``kv_cache``, ``kv_layers`` (its views per layer), ``device``, ``dtype``."""

    kv_cache: torch.Tensor
    kv_layers: list[torch.Tensor]
    device: torch.device
    dtype: torch.dtype

    def block_index(self, block_ids: list[int]) -> Blocks:
        """Which blocks, for ``gather_pages`` and ``scatter_layers``: build it once per transfer, not per layer."""
        return select_blocks(block_ids, self.device)

    def gather_pages(self, layer: int, block_ids: list[int] | Blocks, heads: slice | None = None) -> torch.Tensor:
        """A contiguous copy of one layer's pages: [2, n, block_size, kv_heads, head_dim], of ``heads`` only if
        given."""
        return gather_pages(self.kv_layers[layer], select_blocks(block_ids, self.device), heads)

    def scatter_layers(
        self, first: int, block_ids: list[int] | Blocks, pages: torch.Tensor, heads: slice | None = None
    ) -> None:
        """``pages`` [layers, 2, n, block_size, kv_heads, head_dim] into layers ``first`` onwards, in one copy; into
        KV heads ``heads`` only, if given."""
        blocks = select_blocks(block_ids, self.device)
        # non_blocking: pages in pinned memory (the grpc receiver's) are copied in stream order, not with a sync.
        pages = pages.to(self.device, self.dtype, non_blocking=True)
        scatter_pages(self.kv_cache[first : first + pages.shape[0]], blocks, pages, heads)
