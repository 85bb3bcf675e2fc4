"""The random checkpoint helper writes a real HF checkpoint: sharded with an index, loaded by both our engine and
HF transformers, whose greedy outputs agree (the project's correctness oracle)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from splitserve.bench.make_random_checkpoint import hf_config_dict, make_random_checkpoint, plan_shards, tensor_shapes
from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams

MAX_NEW = 8


def test_shards_respect_the_limit_and_keep_every_tensor_once():
    shapes = tensor_shapes(hf_config_dict("llama3-8b"))
    shards = plan_shards(shapes, 5 << 30)
    assert [t for shard in shards for t in shard] == shapes
    sizes = [sum(torch.Size(s).numel() * 2 for _, s in shard) for shard in shards]
    assert len(shards) == 4 and max(sizes) <= 5 << 30
    assert sum(sizes) == 2 * 8_030_261_248  # Llama-3-8B's parameter count, in bf16 bytes


def test_small_checkpoint_loads_in_engine_and_hf_and_greedy_agrees(tmp_path):
    model_dir = make_random_checkpoint(tmp_path / "small", "small", shard_bytes=1 << 20)  # several shards
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 20, 41)]
    engine = Engine(EngineConfig(RunnerConfig(str(model_dir), device="cpu", dtype="float32", num_kv_blocks=64)))
    ours = [r.token_ids for r in engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))]

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert hf.model.norm.weight.eq(1).all() and 0.015 < hf.lm_head.weight.std() < 0.025
    theirs = [
        hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False)[
            0, len(p) :
        ].tolist()
        for p in prompts
    ]
    assert ours == theirs
