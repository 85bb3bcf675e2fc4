"""Where a decode step's GPU time goes: the torch profiler's kernel times, summed by what each kernel does.

Kernels are grouped by name (cuBLAS/CUTLASS matmuls, our Triton attention and fused elementwise kernels, the rest);
the gap between the step's wall time and its summed kernel time is launch overhead and idle GPU, the part CUDA
graphs remove.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins; patterns are lower-case substrings of kernel names (our Triton kernels, or the functor names
# inside PyTorch's templated elementwise and reduction kernels).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("_decode_kernel", "_merge_kernel", "flash", "attention")),
    ("sampling", ("argmax",)),
    ("rms_norm", ("_rms_norm", "meanops", "rsqrt", "pow_tensor")),
    ("rotary+kv write", ("_rotary", "index_copy", "indexcopy", "catarray", "neg_kernel", "index_elementwise")),
    ("silu*mul", ("_silu", "silu")),
    ("matmul", ("gemm", "gemv", "cutlass", "nvjet", "sm90", "sm80", "xmma", "cublas")),
    ("copy/cast", ("copy", "convert", "cast")),
)
TOP_KERNELS = 12


def category(kernel_name: str) -> str:
    name = kernel_name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in name for k in keys)), "other elementwise")


def kernel_breakdown(step: Callable[[], None], steps: int = 5) -> dict:
    """GPU kernel microseconds per step, by category and for the costliest kernels by name, and the kernel count."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_category: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    launches = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.device_time <= 0:
            continue
        per_category[category(event.name)] += event.device_time / steps
        per_kernel[event.name] += event.device_time / steps
        launches += 1
    return {
        "kernel_us": sum(per_category.values()),
        "kernels_per_step": launches / steps,
        "by_category_us": _descending(per_category),
        "top_kernels_us": dict(list(_descending(per_kernel).items())[:TOP_KERNELS]),
    }


def _descending(times: dict[str, float]) -> dict[str, float]:
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))
