"""The fused Triton kernels of a decoder layer against their torch references (``layer_ops``).

Marked ``gpu``; on CPU they run in Triton's interpreter:
``TRITON_INTERPRET=1 python -m pytest --noconftest -m gpu tests/engine/test_fused_kernels.py``.
In float32 the kernels must agree to fp32 rounding; in bf16 they round at the same points as the torch code, so on
a GPU all but a few elements (where fp32 reduction order moves a value across a bf16 rounding boundary) are
bit-equal and none is off by more than one bf16 step. The interpreter converts to bf16 by truncation, not
rounding, so there each rounding point may cost one more step and only the closeness is checked.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from splitserve.engine.attention import write_kv
from splitserve.engine.layer_ops import rms_norm_torch
from splitserve.engine.rope import RotaryEmbedding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs CUDA or TRITON_INTERPRET=1",
    ),
]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    if INTERPRETED:
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2**-6)
        return
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2**-7)
    assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel(dtype, with_residual):
    from splitserve.engine import triton_fused

    x = _randn(7, 300, dtype=dtype, seed=1)
    residual = _randn(7, 300, dtype=dtype, seed=2, scale=3.0)
    weight = _randn(300, dtype=dtype, seed=3)
    if with_residual:
        want_sum = residual + x
        want = rms_norm_torch(want_sum, weight, 1e-5)
        got = triton_fused.rms_norm(x, weight, 1e-5, residual=residual)
        if INTERPRETED:
            _assert_close(residual, want_sum)
        else:  # the sum is rounded once, as torch's add does
            assert torch.equal(residual, want_sum)
    else:
        want = rms_norm_torch(x, weight, 1e-5)
        got = triton_fused.rms_norm(x, weight, 1e-5)
    _assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_kernel(dtype):
    from splitserve.engine import triton_fused

    gate_up = _randn(5, 2 * 3000, dtype=dtype, seed=4, scale=4.0)  # more columns than one program's block
    gate, up = gate_up.chunk(2, dim=-1)
    _assert_close(triton_fused.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(8, 2, 64), (6, 3, 32)])
def test_rotary_and_cache_kernel(dtype, q_heads, kv_heads, head_dim):
    """q and k rotated in place as RotaryEmbedding.apply does; rotated k and v land in their slots, nothing else."""
    from splitserve.engine import triton_fused

    tokens, page, blocks = 9, 4, 6
    qkv = _randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=5)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(tokens, q_heads, head_dim)
    k = k.view(tokens, kv_heads, head_dim)
    v = v.view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 2, 3, 4, 40, 41, 7, 100], device=DEVICE)
    slots = torch.randperm(blocks * page, generator=torch.Generator().manual_seed(6))[:tokens].to(DEVICE)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), head_dim, 128, DEVICE, dtype)

    want_q, want_k = rope.apply(q.clone(), k.clone(), positions)
    want_cache = _randn(2, blocks, page, kv_heads, head_dim, dtype=dtype, seed=7)
    cache = want_cache.clone()
    write_kv(want_cache, want_k, v, slots)

    triton_fused.rotary_and_cache(q, k, v, rope.cos, rope.sin, positions, cache, slots)
    _assert_close(q, want_q)
    _assert_close(k, want_k)
    untouched = torch.ones(blocks * page, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    flat, want_flat = cache.view(2, -1, kv_heads, head_dim), want_cache.view(2, -1, kv_heads, head_dim)
    assert torch.equal(flat[:, untouched], want_flat[:, untouched])
    assert torch.equal(flat[1, slots], v)  # V is copied, never rounded
    _assert_close(flat[0, slots], want_k)
