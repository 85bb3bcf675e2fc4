"""Tensors to wire bytes and back: raw dtype bytes, or int8/fp8 with one absmax scale per (K|V, block).

Never pickle: a payload is the tensor's raw little-endian bytes; shapes and dtypes travel in the msgpack header.
"""

from __future__ import annotations

import zlib

import torch

CODECS = ("none", "int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}  # largest finite float8_e4m3fn is 448


def _raw_dtype(name: str) -> torch.dtype:
    if name == "int8":
        return torch.int8
    if not hasattr(torch, "float8_e4m3fn"):
        raise ValueError("compression: fp8 needs torch.float8_e4m3fn (fix: use int8 or none)")
    return torch.float8_e4m3fn


def to_host_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes as a zero-copy view of a contiguous CPU copy (bf16/fp8 go through uint8)."""
    host = tensor.detach().contiguous()
    if host.device.type != "cpu":
        host = host.to("cpu")
    return host.view(torch.uint8).numpy().data.cast("B")


def from_bytes(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A view of a uint8 tensor as ``dtype`` of ``shape``: no copy."""
    return raw.view(dtype).view(shape)


def encode_tensor(pages: torch.Tensor, codec: str) -> torch.Tensor:
    """One layer's pages [2, n, ...] as a flat uint8 tensor on their device: raw, or the per-block scales
    (float32 [2, n]) followed by the quantized values."""
    if codec == "none":
        return pages.detach().contiguous().view(torch.uint8).reshape(-1)
    q_dtype = _raw_dtype(codec)
    x = pages.detach().float()
    scale = x.abs().amax(dim=tuple(range(2, x.dim())), keepdim=True).clamp_min(1e-12) / _QMAX[codec]
    q = (x / scale).round() if codec == "int8" else x / scale
    q = q.clamp(-_QMAX[codec], _QMAX[codec]).to(q_dtype)
    return torch.cat((scale.reshape(-1).view(torch.uint8), q.reshape(-1).view(torch.uint8)))


def encode(pages: torch.Tensor, codec: str) -> memoryview:
    return to_host_bytes(encode_tensor(pages, codec))


def decode(raw: torch.Tensor, codec: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``encode`` from the received uint8 bytes (on the device they are on)."""
    if codec == "none":
        return from_bytes(raw, dtype, shape)
    q_dtype = _raw_dtype(codec)
    n_scales = shape[0] * shape[1]
    scales = from_bytes(raw[: n_scales * 4], torch.float32, (shape[0], shape[1], *[1] * (len(shape) - 2)))
    q = from_bytes(raw[n_scales * 4 :], q_dtype, shape)
    return (q.float() * scales).to(dtype)


def encoded_size(codec: str, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Wire bytes of one layer, so the receiver can preallocate and check what arrives."""
    numel = torch.Size(shape).numel()
    if codec == "none":
        return numel * dtype.itemsize
    return shape[0] * shape[1] * 4 + numel


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """Running checksum of the wire payload (zlib.crc32 releases the GIL and runs at memory speed)."""
    return zlib.crc32(data, value)
