"""Write a random-weight Llama checkpoint of a real model's shape, so serving benchmarks need no hub download.

    python -m splitserve.bench.make_random_checkpoint DIR --shape llama3-8b

The directory is a normal HF checkpoint (config.json, bf16 safetensors shards with an index, the byte tokenizer of
``splitserve.engine.testing``), loadable by our engine and by HF transformers alike. Tensors are generated one at a
time and written shard by shard, so memory peaks at one shard (~5 GB), not at the model's size.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from splitserve.engine.testing import BYTE_VOCAB, SPECIAL_TOKENS, build_byte_tokenizer

SHARD_BYTES = 5 << 30
DTYPE = torch.bfloat16
SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B: 32 layers, GQA 32/8 heads, 128k vocab.
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    # Seconds to write and load on a CPU: tests and smoke runs of the benchmark itself.
    "small": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
    },
}


def hf_config_dict(shape: str) -> dict[str, Any]:
    """A LlamaConfig whose special token ids are the byte tokenizer's (BOS, EOS, PAD follow the 256 bytes)."""
    bos, eos, pad = (BYTE_VOCAB + i for i in range(len(SPECIAL_TOKENS)))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **SHAPES[shape],
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": "bfloat16",
    }


def llama_config(shape: str) -> Any:
    """The same shape as a transformers LlamaConfig, for benchmarks that build random weights in memory."""
    from transformers import LlamaConfig

    return LlamaConfig.from_dict(hf_config_dict(shape))


def tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint under its HF name, in file order."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return shapes


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], limit: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped so each shard stays under ``limit`` bytes (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * DTYPE.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _tensors(
    shard: list[tuple[str, tuple[int, ...]]], std: float, gen: torch.Generator, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in shard:
        if len(shape) == 1:  # RMSNorm weights: identity scale, as a freshly initialised model has
            yield name, torch.ones(shape, dtype=DTYPE)
        else:
            yield name, torch.empty(shape, dtype=DTYPE, device=device).normal_(0.0, std, generator=gen).cpu()


def make_random_checkpoint(
    path: str | Path, shape: str, seed: int = 0, std: float = 0.02, device: str = "cpu", shard_bytes: int = SHARD_BYTES
) -> Path:
    """Write the checkpoint to ``path`` and return it; the same (shape, seed, std, device) gives the same weights."""
    if shape not in SHAPES:
        raise ValueError(f"shape: unknown {shape!r} (fix: one of {', '.join(SHAPES)})")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config_dict(shape)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    build_byte_tokenizer().save_pretrained(out)
    torch_device = torch.device(device)
    gen = torch.Generator(device=torch_device).manual_seed(seed)
    shards = plan_shards(tensor_shapes(cfg), shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = dict(_tensors(shard, std, gen, torch_device))
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitserve.bench.make_random_checkpoint", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dir", help="output directory (created)")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the random weights")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where weights are drawn (cuda is faster)"
    )
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    path = make_random_checkpoint(args.dir, args.shape, seed=args.seed, std=args.std, device=device)
    print(f"wrote {args.shape} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
