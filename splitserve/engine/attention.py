"""Attention over the paged KV cache for a packed batch: prefill chunks first, then decode tokens.

The KV cache of one layer is a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V), so a
sequence's pages of one layer are ``cache[:, block_ids]``: what the KV transfer layer sends as soon as the layer is
done. This module is the plain-torch path (CPU, and the GPU fallback); it uses SDPA with native GQA, so KV heads are
never repeated. On CUDA the runner plugs a paged decode kernel into the metadata (``decode_kernel``), which reads
the pages in place and has shapes that do not depend on the context lengths, as CUDA graphs need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Prefill attention backends, in order of preference. Not cuDNN, which PyTorch picks first on Hopper: it builds an
# execution plan per new (query, key) length, ~50 ms each for an 8B model on an H100, and a server sees a new prompt
# length in almost every request (it added ~50-75 ms to TTFT while serving). Flash has no per-shape set-up.
_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(q [D, Hq, dim], layer cache, block tables [D, max_blocks], context lens [D], scale) -> [D, Hq, dim]."""


@dataclass
class AttentionMetadata:
    """Where each token of the packed batch reads and writes KV."""

    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    block_size: int
    # Prefill chunks: the first sum(prefill_query_lens) tokens.
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]  # KV length of each prefill sequence once this chunk is written
    prefill_block_tables: torch.Tensor | None  # [P, max_blocks]
    # Decode tokens: the rest, one per sequence.
    decode_block_tables: torch.Tensor | None  # [D, max_blocks]
    decode_context_lens: torch.Tensor | None  # [D] KV length including the new token
    decode_max_context: int = 0
    decode_kernel: DecodeKernel | None = None  # None: the torch decode_attention below

    @classmethod
    def whole_prompt(cls, slot_mapping: torch.Tensor, block_size: int) -> AttentionMetadata:
        """One prompt from its first token, nothing else: its attention is its own causal block."""
        tokens = slot_mapping.shape[0]
        return cls(
            slot_mapping=slot_mapping,
            block_size=block_size,
            prefill_query_lens=[tokens],
            prefill_context_lens=[tokens],
            prefill_block_tables=None,
            decode_block_tables=None,
            decode_context_lens=None,
        )

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_query_lens)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V ([T, Hkv, D]) into their slots."""
    _, _, _, heads, dim = cache.shape
    cache[0].view(-1, heads, dim).index_copy_(0, slot_mapping, k)
    cache[1].view(-1, heads, dim).index_copy_(0, slot_mapping, v)


def _slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions [0, length) for one or many block tables ([..., max_blocks])."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[..., pos // block_size] * block_size + pos % block_size


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, _, heads, dim = cache.shape
    return cache[0].view(-1, heads, dim)[slots], cache[1].view(-1, heads, dim)[slots]


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already rotated and already in the cache). Returns [T, Hq, D]."""
    if not meta.prefill_query_lens:  # decode only: no packing, the decode output is the output
        return _decode(q, cache, meta, scale)
    out = torch.empty_like(q)
    with sdpa_kernel(_PREFILL_BACKENDS):
        start = _prefill(q, k, v, cache, meta, scale, out)
    if meta.decode_block_tables is not None and start < q.shape[0]:
        out[start:] = _decode(q[start:], cache, meta, scale)
    return out


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> int:
    """Each prefill chunk's attention into ``out``; returns where the decode tokens start."""
    start = 0
    for i, (qlen, ctx) in enumerate(zip(meta.prefill_query_lens, meta.prefill_context_lens, strict=True)):
        mask: torch.Tensor | None = None
        if ctx == qlen:  # no earlier context: this chunk's own K/V
            ki, vi = k[start : start + qlen], v[start : start + qlen]
        else:  # a later chunk, or a prefix-cache hit: the cached context too
            assert meta.prefill_block_tables is not None
            ki, vi = _gather(cache, _slots(meta.prefill_block_tables[i], ctx, meta.block_size))
            mask = _suffix_causal_mask(qlen, ctx, q.device)
        oi = F.scaled_dot_product_attention(
            q[start : start + qlen].transpose(0, 1).unsqueeze(0),
            ki.transpose(0, 1).unsqueeze(0),
            vi.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[start : start + qlen] = oi.squeeze(0).transpose(0, 1)
        start += qlen
    return start


def _suffix_causal_mask(qlen: int, ctx: int, device: torch.device) -> torch.Tensor:
    """Causal attention for queries at the last ``qlen`` of ``ctx`` positions (aligned to the lower right).

    On CUDA, PyTorch's lower-right causal bias, which flash runs without materializing anything (a boolean mask
    would send the call to the math backend, with [heads, qlen, ctx] scores in memory). Imported here: it loads
    torch._dynamo (~2 s), which CPU processes need not pay for the plain mask they use.
    """
    if device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(qlen, ctx)
    q_pos = torch.arange(ctx - qlen, ctx, device=device)
    return torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]


def _decode(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    if meta.decode_kernel is None:
        return decode_attention(q, cache, meta, scale)
    assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
    return meta.decode_kernel(q, cache, meta.decode_block_tables, meta.decode_context_lens, scale)


def decode_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence over its paged context, all sequences in one batched call."""
    assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
    length = meta.decode_max_context
    ks, vs = _gather(cache, _slots(meta.decode_block_tables, length, meta.block_size))  # [D, L, Hkv, dim]
    mask = torch.arange(length, device=q.device)[None, :] < meta.decode_context_lens[:, None]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [D, Hq, 1, dim]
        ks.transpose(1, 2),
        vs.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(2)
