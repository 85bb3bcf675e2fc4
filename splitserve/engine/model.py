"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a packed token stream and a paged KV cache.

The arithmetic follows HF transformers op for op (fp32 RMSNorm, rotate-half RoPE, SwiGLU), which is what lets the
engine's greedy output equal HF's token for token. q/k/v and gate/up are fused into one matmul each; on CUDA the
elementwise steps between the matmuls are one kernel each (``layer_ops``), and each sublayer's residual add is fused
into the norm that follows it, so the residual stream is passed from layer to layer next to the normed hidden state.

Given a ``RankGroup``, the model is one rank's shard (``tensor_parallel``): its attention and MLP are built from the
rank's local shape, and the row-parallel projections, the embedding and the LM head join the group's collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata, paged_attention
from splitserve.engine.layer_ops import add_rms_norm, rms_norm, rotary_and_cache, silu_and_mul
from splitserve.engine.model_spec import ModelSpec
from splitserve.engine.rope import RotaryEmbedding
from splitserve.engine.tensor_parallel import RankGroup, Shard

LayerHook = Callable[[int], None]
"""Called with a layer's index as soon as that layer's KV for the batch is in the cache."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Over the last dimension of ``x``, of any rank."""
        rows = x.reshape(-1, x.shape[-1])
        return rms_norm(rows, self.weight, self.eps).view(x.shape)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed residual + x, residual + x); ``residual`` may be overwritten with the sum."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, tp: RankGroup | None):
        """``spec``: this rank's shape (its heads only, under tensor parallelism)."""
        super().__init__()
        self.spec = spec
        self.tp = tp
        self.qkv_proj = nn.Linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.attention_bias)
        self.o_proj = nn.Linear(spec.q_size, spec.hidden_size, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.scale = spec.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        s = self.spec
        q, k, v = self.qkv_proj(x).split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)
        k = k.view(-1, s.num_kv_heads, s.head_dim)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary_and_cache(q, k, v, rope, positions, cache, meta.slot_mapping)
        o = paged_attention(q, k, v, cache, meta, self.scale)
        out = self.o_proj(o.reshape(-1, s.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: RankGroup | None):
        super().__init__()
        self.tp = tp
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return out if self.tp is None else self.tp.all_reduce(out)


class VocabShardEmbedding(nn.Module):
    """One rank's rows of the embedding: each token is looked up by the rank that holds it, zeros elsewhere, and the
    all-reduce sums the rows into every rank's copy."""

    def __init__(self, shard: Shard, tp: RankGroup):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shard.vocab_rows, shard.spec.hidden_size))
        self.first, self.held = shard.vocab.start, len(shard.vocab)
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.held)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, tp: RankGroup | None):
        super().__init__()
        self.self_attn = Attention(spec, tp)
        self.mlp = MLP(spec, tp)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        next_norm: RMSNorm,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` is this layer's input already normed; returns the next norm's output and the residual stream.

        Same sums as HF's ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, with each add done inside the next norm.
        """
        attn = self.self_attn(hidden, positions, rope, cache, meta)
        hidden, residual = self.post_attention_layernorm.add_forward(attn, residual)
        return next_norm.add_forward(self.mlp(hidden), residual)


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, tp: RankGroup | None = None):
        super().__init__()
        self.spec = spec
        self.tp = tp
        self.shard = Shard(spec) if tp is None else Shard(spec, tp.rank, tp.size)
        local = self.shard.local_spec()
        self.embed_tokens: nn.Embedding | VocabShardEmbedding = (
            nn.Embedding(spec.vocab_size, spec.hidden_size) if tp is None else VocabShardEmbedding(self.shard, tp)
        )
        self.layers = nn.ModuleList(DecoderLayer(local, tp) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, self.shard.vocab_rows, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        layer_hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        residual = self.embed_tokens(input_ids)
        layers = cast(list[DecoderLayer], list(self.layers))
        hidden = layers[0].input_layernorm(residual)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [self.norm]
        for i, (layer, next_norm) in enumerate(zip(layers, next_norms, strict=True)):
            hidden, residual = layer(hidden, residual, next_norm, positions, rope, kv_caches[i], meta)
            if layer_hook is not None:
                layer_hook(i)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [T, vocab], the whole vocabulary on every rank."""
        weight = self.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight
        if self.tp is None:
            return F.linear(hidden, weight).float()
        gathered = self.tp.all_gather_columns(F.linear(hidden, weight))
        return gathered[:, : self.spec.vocab_size].float()
