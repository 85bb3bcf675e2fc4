"""Kernel names from a decode step land in the category the engine benchmark's profile table reports them under."""

from __future__ import annotations

import pytest

from splitserve.bench.step_profile import category


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ("nvjet_tst_128x64_64x8_1x1_v_bz_TNN", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "matmul"),
        ("_decode_kernel", "attention"),
        ("_merge_kernel", "attention"),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>", "sampling"),
        ("at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>", "rms_norm"),
        ("_rms_norm_kernel", "rms_norm"),
        ("void at::native::index_copy_kernel_impl", "rotary+kv write"),
        ("_silu_and_mul_kernel", "silu*mul"),
        ("void at::native::direct_copy_kernel_cuda", "copy/cast"),
        ("vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>", "other elementwise"),
    ],
)
def test_kernel_categories(kernel, expected):
    assert category(kernel) == expected
