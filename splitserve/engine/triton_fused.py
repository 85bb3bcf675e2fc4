"""One Triton kernel each for the elementwise work of a decoder layer: residual add + RMSNorm, rotary + KV write,
SiLU-and-multiply.

In plain torch these are ~30 small kernels per layer (fp32 RMSNorm alone is seven), which at decode batch sizes cost
more in launches and round trips through memory than the matmuls they sit between. Each kernel here rounds to the
model's dtype at exactly the points HF's eager code does (the bf16 product ``q * cos`` is rounded before the sum,
the residual sum is rounded before it is normalised), so the output stays that of the torch reference in
``splitserve.engine.layer_ops`` up to fp32 rounding inside a step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=ok)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(variance + eps)).to(dtype)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` [T, N]; with ``residual``, of ``residual + x``, whose sum is written back into
    ``residual`` (it is the next residual stream)."""
    rows, cols = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous()
    out = torch.empty_like(x)
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1
    if rows == 0:
        return out
    block = triton.next_power_of_2(cols)
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded (to nearest even) to ``dtype``'s precision, kept in fp32.

    For bf16 the rounding is done on the bits: written as a cast, LLVM narrows ``trunc(a * b) - trunc(c * d)`` to
    bf16 arithmetic and then fuses one product into an FMA with the difference, which skips that product's
    rounding (on the H100 the rotary output then differed from torch's in ~20% of elements by one step).
    """
    if dtype == tl.float32:
        return x
    elif dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rotate_rows(ptr, cos1, sin1, cos2, sin2, heads, dims, ok, HALF: tl.constexpr):
    """Rotate-half RoPE of one token's heads in place; returns the rotated halves for the cache."""
    dtype = ptr.dtype.element_ty
    lo = ptr + heads[:, None] * (2 * HALF) + dims[None, :]
    x1 = tl.load(lo, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(lo + HALF, mask=ok, other=0.0).to(tl.float32)
    # As HF in the model's dtype: x * cos and rotate_half(x) * sin are each rounded, then their sum.
    y1 = (_rounded(x1 * cos1, dtype) - _rounded(x2 * sin1, dtype)).to(dtype)
    y2 = (_rounded(x2 * cos2, dtype) + _rounded(x1 * sin2, dtype)).to(dtype)
    tl.store(lo, y1, mask=ok)
    tl.store(lo + HALF, y2, mask=ok)
    return y1, y2


@triton.jit
def _rotary_cache_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    slots_ptr,
    cache_ptr,
    stride_q,
    stride_k,
    stride_v,
    stride_table,
    v_plane,
    Q_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    Q_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    dim_ok = dims < HALF
    table = pos * stride_table + dims
    cos1 = tl.load(cos_ptr + table, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + table + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + table, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + table + HALF, mask=dim_ok, other=0.0).to(tl.float32)[None, :]

    q_heads = tl.arange(0, Q_PAD)
    q_ok = (q_heads < Q_HEADS)[:, None] & dim_ok[None, :]
    _rotate_rows(q_ptr + token * stride_q, cos1, sin1, cos2, sin2, q_heads, dims, q_ok, HALF)

    kv_heads = tl.arange(0, KV_PAD)
    kv_ok = (kv_heads < KV_HEADS)[:, None] & dim_ok[None, :]
    k1, k2 = _rotate_rows(k_ptr + token * stride_k, cos1, sin1, cos2, sin2, kv_heads, dims, kv_ok, HALF)
    # The cache slot holds [KV_HEADS, 2 * HALF]; the V plane starts v_plane elements after the K plane.
    dst = cache_ptr + slot * (KV_HEADS * 2 * HALF) + kv_heads[:, None] * (2 * HALF) + dims[None, :]
    tl.store(dst, k1, mask=kv_ok)
    tl.store(dst + HALF, k2, mask=kv_ok)
    v_src = v_ptr + token * stride_v + kv_heads[:, None] * (2 * HALF) + dims[None, :]
    tl.store(dst + v_plane, tl.load(v_src, mask=kv_ok, other=0.0), mask=kv_ok)
    tl.store(dst + v_plane + HALF, tl.load(v_src + HALF, mask=kv_ok, other=0.0), mask=kv_ok)


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place and write k and v into their cache slots.

    ``cache`` is one layer's [2, blocks, block_size, Hkv, D], contiguous; cos/sin are [positions, D] tables.
    """
    tokens, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(2) == 1 and t.stride(1) == dim, f"{name} must have contiguous heads"
    assert cache.is_contiguous() and cos.stride(1) == 1 and cos.stride() == sin.stride() and dim % 2 == 0
    if tokens == 0:
        return
    half = dim // 2
    _rotary_cache_kernel[(tokens,)](
        q,
        k,
        v,
        cos,
        sin,
        positions,
        slots,
        cache,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        cos.stride(0),
        cache.stride(0),
        Q_HEADS=q_heads,
        KV_HEADS=kv_heads,
        Q_PAD=triton.next_power_of_2(q_heads),
        KV_PAD=triton.next_power_of_2(kv_heads),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
    )


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # F.silu rounds to the dtype before the product
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(dtype), mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``gate_up`` [T, 2I] holding gate then up; returns [T, I]."""
    rows, width = gate_up.shape
    assert gate_up.stride(1) == 1 and width % 2 == 0
    n = width // 2
    out = torch.empty(rows, n, device=gate_up.device, dtype=gate_up.dtype)
    if rows == 0:
        return out
    block = min(2048, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
    )
    return out
