"""Paged decode attention as a Triton kernel: one query token per sequence, read straight from the KV pages.

The torch path gathers every sequence's pages into a padded copy and runs SDPA over it; here each program reads
the pages in place. One program handles one (sequence, KV head, split) and all query heads of that GQA group, so
KV is read once per group and never repeated. Softmax is online over tiles of tokens, accumulated in fp32.

Every shape depends only on the batch size and the block-table width, never on the context lengths: a program
loops up to its own sequence's length, which it reads from memory. That is what lets the kernel live inside a CUDA
graph, and what makes padded rows (context length 0) cheap and harmless: they write zeros and read nothing.

Small batches split each sequence's tokens across several programs (flash-decoding) so that enough programs run
to keep the GPU's memory system busy; a second small kernel merges the splits.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter gets bf16/fp16 tl.dot wrong, so under it the tiles are multiplied in fp32 (the tests'
# CPU mode); on a GPU they are multiplied in the cache's dtype on the tensor cores.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SPLITS = 16
PROGRAMS_PER_SM = 2  # splits are added until the grid has about this many programs per SM


# Not specialised on the block tables' row stride: it is the widest table of an eager step, so specialising (on
# 1 or a multiple of 16) would compile new variants while serving.
@triton.jit(do_not_specialize=["stride_tb"])
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + seq).to(tl.int32)
    # Each split covers a run of whole tiles of this sequence's own context, so every split has work when the
    # context is long, whatever the block-table width.
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), NUM_SPLITS)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, ctx)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        ok = toks < hi
        page = tl.load(tables_ptr + seq * stride_tb + toks // PAGE, mask=ok, other=0).to(tl.int64)
        offs = page * stride_cb + (toks % PAGE) * stride_ct + kv_head * stride_ch
        kv_mask = ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        # The tile's first token is always valid, so m_new is finite from the first tile on.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.where(denom > 0, denom, 1.0)[:, None]  # denom == 0 only for an empty context: write zeros
        out_offs = seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_offs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        # Partials are [B, Hq, splits(, D)] and contiguous; empty splits store m = -inf, denom = 0, acc = 0.
        part = (seq * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m, mask=row_ok)
        tl.store(part_l_ptr + part, denom, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, BLOCK_D)
    split_ok = splits < NUM_SPLITS
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    m = tl.load(part_m_ptr + part, mask=split_ok, other=float("-inf"))
    denom = tl.load(part_l_ptr + part, mask=split_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights all 0, output 0
    w = tl.exp(m - m_max)
    total = tl.sum(w * denom, 0)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], mask=split_ok[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter mode on CPU: behave as an H100 would
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """How many programs share one (sequence, KV head): enough to fill the GPU.

    It depends on the batch only, not on context lengths (short contexts leave some splits empty, which costs
    almost nothing), and is a power of two, so eager mode compiles at most a handful of kernel variants.
    """
    programs = batch * kv_heads
    target = PROGRAMS_PER_SM * _sm_count(device)
    if programs >= target:
        return 1
    return min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(target, programs)))


def paged_decode_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, Hq, D] against one layer's cache [2, blocks, block_size, Hkv, D]; returns [B, Hq, D] in q's dtype.

    ``block_tables`` [B, max_blocks] and ``context_lens`` [B] may be int32 or int64. A row with context length 0
    reads nothing and gets zeros, so a batch can be padded with such rows.
    """
    batch, q_heads, head_dim = q.shape
    _, _, page, kv_heads, _ = cache.shape
    assert q.stride(2) == 1 and cache.stride(-1) == 1 and q_heads % kv_heads == 0
    group = q_heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if q.element_size() <= 2 else 32
    splits = num_splits(batch, kv_heads, q.device)
    # Not empty_like: q is often a strided view of the fused qkv projection, and the output must be dense.
    out = torch.empty(batch, q_heads, head_dim, device=q.device, dtype=q.dtype)
    if splits > 1:
        part_acc = torch.empty(batch, q_heads, splits, block_d, device=q.device, dtype=torch.float32)
        part_m = torch.empty(batch, q_heads, splits, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused: the kernel writes the output directly
    k, v = cache[0], cache[1]
    fp32_dot = _INTERPRET or q.dtype == torch.float32
    _decode_kernel[(batch, kv_heads, splits)](
        q,
        k,
        v,
        block_tables,
        context_lens,
        out,
        part_acc,
        part_m,
        part_l,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=block_n,
        NUM_SPLITS=splits,
        DOT_DTYPE=tl.float32 if fp32_dot else _TL_DTYPES[q.dtype],
        DOT_PRECISION="ieee" if fp32_dot else "tf32",
    )
    if splits > 1:
        _merge_kernel[(batch, q_heads)](
            out,
            part_acc,
            part_m,
            part_l,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            NUM_SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits),
        )
    return out
