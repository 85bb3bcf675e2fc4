"""A tiny random-weight checkpoint written to disk, so tests and the CPU default exercise the real loading path.

Nothing here touches a hub: the tokenizer is a byte-level BPE built in memory and saved with ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_ARCHES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 32},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None},
}


def build_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token, plus BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    assert len(vocab) == BYTE_VOCAB
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config_dict(arch: str = "llama", **overrides: Any) -> dict[str, Any]:
    if arch not in _ARCHES:
        raise ValueError(f"arch: unknown tiny architecture {arch!r} (fix: one of {', '.join(_ARCHES)})")
    cfg: dict[str, Any] = {
        "vocab_size": BYTE_VOCAB + len(SPECIAL_TOKENS),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": BYTE_VOCAB,
        "eos_token_id": BYTE_VOCAB + 1,
        "pad_token_id": BYTE_VOCAB + 2,
        "dtype": "float32",
    }
    cfg.update(_ARCHES[arch])
    cfg.update(overrides)
    return cfg


def make_tiny_model(path: str | os.PathLike[str], arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a random-weight checkpoint + tokenizer to ``path`` and return it.

    The same (arch, seed, overrides) always gives the same weights, so workers on different nodes that each build
    the tiny model hold identical copies.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_dict = tiny_config_dict(arch, **overrides)
    config = AutoConfig.for_model(**cfg_dict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # HF's init is small (std 0.02); widen it so logits are well separated and greedy ties are unlikely.
        for param in model.parameters():
            if param.dim() > 1:
                torch.nn.init.normal_(param, std=0.2)
    model.save_pretrained(path, safe_serialization=True)
    build_byte_tokenizer().save_pretrained(path)
    return path


def tiny_model_dir(arch: str = "llama", seed: int = 0) -> Path:
    """The built-in tiny model, created once per machine under the user's cache directory."""
    key = hashlib.sha256(json.dumps([arch, seed, tiny_config_dict(arch)], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))
    target = root / f"tiny-{arch}-{key}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    staging = root / f".{target.name}.{os.getpid()}"
    make_tiny_model(staging, arch=arch, seed=seed)
    try:
        staging.rename(target)  # atomic: concurrent workers never see a half-written model
    except OSError:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


def hf_greedy_reference(
    model_dir: str | os.PathLike[str], prompts: list[list[int]], max_new_tokens: int, dtype: torch.dtype = torch.float32
) -> list[list[int]]:
    """HF transformers' greedy continuation of each prompt, never stopping at EOS (the engine's ``ignore_eos``).

    EOS stays a candidate: ``min_new_tokens`` would instead mask it out of the argmax, which is a different
    continuation whenever EOS is the most likely token.
    """
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.generation_config.eos_token_id = None
    outputs = []
    for prompt in prompts:
        ids = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
        outputs.append(ids[0, len(prompt) :].tolist())
    return outputs


def save_rank_state(runner: Any, directory: str) -> None:
    """Write a tensor-parallel rank's KV cache and its parameters' byte count to ``directory/rank<r>.pt``: run in a
    follower's process (``rank_loop.offline_engine``'s ``follower_done``), so a test can compare ranks."""
    rank, _ = runner.rank_and_size
    torch.save(rank_state(runner), Path(directory) / f"rank{rank}.pt")


def rank_state(runner: Any) -> dict[str, Any]:
    """A runner's KV cache, its KV heads and the bytes of its parameters."""
    return {
        "kv_cache": runner.kv_cache.clone(),
        "kv_heads": list(runner.model.shard.kv_heads),
        "param_bytes": sum(p.numel() * p.element_size() for p in runner.model.parameters()),
    }
