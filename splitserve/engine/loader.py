"""Build a model from an HF checkpoint directory (config.json + *.safetensors), or with random weights.

Weights stream tensor by tensor from safetensors straight into the fused parameters on the target device, so an
8B checkpoint never needs a second copy in host memory. A tensor-parallel rank reads only its slice of each tensor
(``safe_open(...).get_slice``), so it never holds more than its share of the model; its fused q/k/v weight is
[its q heads | its k heads | its v heads], and its gate/up weight [its gate columns | its up columns].
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from splitserve.engine.model import CausalLM
from splitserve.engine.model_spec import ModelSpec
from splitserve.engine.tensor_parallel import RankGroup, Shard

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# checkpoint name -> (our parameter name, shard index in a fused parameter or None)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_VOCAB_PARAMS = ("embed_tokens.weight", "lm_head.weight")


class CheckpointError(ValueError):
    pass


def load_hf_config(model_dir: str | Path) -> Any:
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"model.path: {path} has no config.json (fix: point it at an HF checkpoint directory, or use 'tiny')"
        )
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _shard_sizes(spec: ModelSpec, fused: str) -> list[int]:
    if fused.endswith("qkv_proj"):
        return [spec.q_size, spec.kv_size, spec.kv_size]
    return [spec.intermediate_size, spec.intermediate_size]


def _rank_slice(name: str, shard: Shard) -> tuple[int, range] | None:
    """The dimension and range of checkpoint tensor ``name`` that ``shard``'s rank holds; None: all of it."""
    head_dim = shard.spec.head_dim
    module = name.rsplit(".", 1)[0]
    if module.endswith("self_attn.q_proj"):
        return 0, range(shard.heads.start * head_dim, shard.heads.stop * head_dim)
    if module.endswith(("self_attn.k_proj", "self_attn.v_proj")):
        return 0, range(shard.kv_heads.start * head_dim, shard.kv_heads.stop * head_dim)
    if module.endswith("self_attn.o_proj"):
        return 1, range(shard.heads.start * head_dim, shard.heads.stop * head_dim)
    if module.endswith(("mlp.gate_proj", "mlp.up_proj")):
        return 0, shard.intermediate
    if module.endswith("mlp.down_proj"):
        return 1, shard.intermediate
    if module in ("model.embed_tokens", "lm_head"):
        return 0, shard.vocab
    return None


def _read(f: Any, name: str, shard: Shard) -> torch.Tensor:
    """Tensor ``name``, or only this rank's slice of it."""
    cut = _rank_slice(name, shard) if shard.size > 1 else None
    if cut is None:
        return f.get_tensor(name)
    dim, rows = cut
    index = (slice(None),) * dim + (slice(rows.start, rows.stop),)
    return f.get_slice(name)[index]


def _target(model: CausalLM, name: str) -> tuple[torch.Tensor, int | None, str]:
    """The parameter a checkpoint tensor lands in, and its shard index for fused parameters."""
    if name == "lm_head.weight" and model.spec.tie_word_embeddings:
        return model.embed_tokens.weight, None, "embed_tokens.weight"
    m = _LAYER.match(name)
    if m:
        layer, rest = m.groups()
        module, _, leaf = rest.rpartition(".")
        fused = _FUSED.get(module)
        if fused:
            ours = f"layers.{layer}.{fused[0]}.{leaf}"
            return model.get_parameter(ours), fused[1], ours
        ours = f"layers.{layer}.{rest}"
    else:
        ours = name.removeprefix("model.")
    try:
        return model.get_parameter(ours), None, ours
    except AttributeError:
        raise CheckpointError(f"checkpoint tensor {name!r} has no place in a {model.spec.model_type} model") from None


@torch.no_grad()
def load_weights(model: CausalLM, model_dir: str | Path) -> None:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model.path: no *.safetensors in {model_dir} (fix: save the model with safetensors)")
    expected = {name for name, _ in model.named_parameters()}
    local = model.shard.local_spec()
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if "rotary_emb" in name:
                    continue
                param, part, ours = _target(model, name)
                tensor = _read(f, name, model.shard)
                if part is None:
                    dest = param
                    if ours in _VOCAB_PARAMS and model.shard.size > 1:  # the last rank's rows past the vocabulary
                        held = len(model.shard.vocab)
                        param[held:].zero_()
                        dest = param.narrow(0, 0, held)
                    loaded.add(ours)
                else:
                    sizes = _shard_sizes(local, ours.rsplit(".", 1)[0])
                    offset = sum(sizes[:part])
                    dest = param.narrow(0, offset, sizes[part])
                    loaded.add(f"{ours}#{part}")
                if dest.shape != tensor.shape:
                    raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(dest.shape)}")
                dest.copy_(tensor)
    missing = []
    for name in expected:
        base = name.rsplit(".", 1)[0]
        if base.endswith(("qkv_proj", "gate_up_proj")):
            n = len(_shard_sizes(local, base))
            if not all(f"{name}#{i}" in loaded for i in range(n)):
                missing.append(name)
        elif name not in loaded:
            missing.append(name)
    if missing:
        raise CheckpointError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def build_model(
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    model_dir: str | Path | None,
    seed: int = 0,
    tp: RankGroup | None = None,
) -> CausalLM:
    """The model (or ``tp``'s rank's shard of it) on ``device``: weights from ``model_dir``, or random (benchmarks
    of large shapes) when None."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype: no fp32 copy of a large model
    try:
        with torch.device("meta"):
            model = CausalLM(spec, tp)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    if model_dir is not None:
        load_weights(model, model_dir)
    else:
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif p.dim() == 1:
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)
