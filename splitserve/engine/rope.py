"""Rotary position embeddings as the HF checkpoints define them, precomputed for every position once."""

from __future__ import annotations

from typing import Any

import torch


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def inverse_frequencies(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """The per-pair frequencies and the cos/sin scale; scaled variants come from transformers' own init functions."""
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    # 'dynamic' NTK scaling only changes frequencies past the trained context, which the engine never exceeds.
    if rope_type in ("default", "dynamic"):
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scale)


class RotaryEmbedding:
    """cos/sin tables for positions [0, max_positions), in the model's dtype, on the model's device."""

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int, device: torch.device, dtype: torch.dtype):
        inv_freq, scale = inverse_frequencies(hf_config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * scale).to(device=device, dtype=dtype)

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D], positions: [T]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
