"""The elementwise steps of a decoder layer, each either plain torch (CPU, and the reference) or one fused Triton
kernel (CUDA, ``triton_fused``).

The torch versions follow HF transformers op for op (fp32 RMSNorm, rotate-half RoPE in the model's dtype, SiLU
rounded before the product); the kernels round at the same points, which is what keeps greedy output equal to HF's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.engine.attention import write_kv
from splitserve.engine.rope import RotaryEmbedding

FUSABLE = ("rms_norm", "rotary", "silu")
fused_ops: set[str] = set(FUSABLE)
"""The steps that use their Triton kernel on CUDA tensors; benchmarks narrow it to measure the plain-torch path."""


def _fused(x: torch.Tensor, op: str) -> bool:
    return x.is_cuda and op in fused_ops


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _fused(x, "rms_norm"):
        from splitserve.engine import triton_fused

        return triton_fused.rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x): the residual add of one sublayer fused with the next norm.

    On CUDA the sum is written into ``residual`` in place, so the caller must own it.
    """
    if _fused(x, "rms_norm"):
        from splitserve.engine import triton_fused

        return triton_fused.rms_norm(x, weight, eps, residual=residual), residual
    summed = residual + x
    return rms_norm_torch(summed, weight, eps), summed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``gate_up`` [T, 2I] (gate then up)."""
    if _fused(gate_up, "silu"):
        from splitserve.engine import triton_fused

        return triton_fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: RotaryEmbedding,
    positions: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k), with the rotated k and v written into their cache slots."""
    if _fused(q, "rotary"):
        from splitserve.engine import triton_fused

        triton_fused.rotary_and_cache(q, k, v, rope.cos, rope.sin, positions, cache, slots)
        return q, k
    q, k = rope.apply(q, k, positions)
    write_kv(cache, k, v, slots)
    return q, k
