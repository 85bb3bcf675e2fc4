"""Gathering and scattering one layer's KV pages at copy speed.

``index_select`` / ``index_copy_`` move one element per thread: on bf16 pages that runs at about half the device's
copy rate (H100, 67 MB of 8B-model pages: 530 vs 1130 GB/s). Viewed as int64 words the same kernels move 8 bytes
per element and reach ~90% of it. The pages are opaque bytes here, so the view changes nothing else.
"""

from __future__ import annotations

import torch


def _words(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` viewed as int64 words along its last dimension, or None where its layout does not allow it."""
    if t.element_size() >= 8:
        return None
    try:
        return t.view(torch.int64)
    except RuntimeError:  # last dim not contiguous, or a size/stride/offset not a whole number of words
        return None


# The block axis, counted from the end, of a layer's cache [2, blocks, block, heads, dim] and of a run of layers
# [layers, 2, blocks, ...] alike (the int64 view keeps the number of dimensions).
_BLOCKS = -4


def gather_pages(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the blocks ``index`` of one layer's cache, or of a run of layers."""
    words = _words(cache)
    if words is None:
        return cache.index_select(_BLOCKS, index)
    return words.index_select(_BLOCKS, index).view(cache.dtype)


def scatter_pages(cache: torch.Tensor, index: torch.Tensor, pages: torch.Tensor) -> None:
    """Write ``pages`` into the blocks ``index`` of one layer's cache, or of a run of layers (same dtype and
    device; ``pages`` has the cache's shape with ``len(index)`` blocks)."""
    dst, src = _words(cache), _words(pages)
    if dst is None or src is None:
        cache.index_copy_(_BLOCKS, index, pages)
    else:
        dst.index_copy_(_BLOCKS, index, src)
