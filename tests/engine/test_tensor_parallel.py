"""Tensor parallelism on CPU: real follower processes over gloo, on the tiny checkpoints.

The sharded engine's greedy output equals HF's, each rank holds about 1/tp of the parameters, and its KV pages,
put together by head, are the unsharded engine's pages.
"""

from __future__ import annotations

import functools

import pytest
import torch

from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams
from splitserve.engine.model_spec import ModelSpec
from splitserve.engine.rank_loop import offline_engine
from splitserve.engine.step_plan import DecodeGraphPass, EagerPass, PromptGraphPass, pack, unpack
from splitserve.engine.tensor_parallel import Shard, TensorParallelError
from splitserve.engine.testing import hf_greedy_reference, rank_state, save_rank_state

MAX_NEW = 6


def _spec(heads: int = 8, kv_heads: int = 2, intermediate: int = 64, vocab: int = 259) -> ModelSpec:
    return ModelSpec(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=intermediate,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=False,
        qk_norm=False,
        eos_token_ids=(),
        bos_token_id=None,
    )


def test_kv_heads_split_when_they_are_enough_and_are_replicated_when_fewer_than_ranks():
    spec = _spec(heads=8, kv_heads=2)
    assert [list(Shard(spec, r, 2).kv_heads) for r in range(2)] == [[0], [1]]
    assert [list(Shard(spec, r, 4).kv_heads) for r in range(4)] == [[0], [0], [1], [1]]
    for rank in range(4):  # every query head of a rank reads the KV head it holds (8 / 2 = 4 queries per KV head)
        shard = Shard(spec, rank, 4)
        assert {h // 4 for h in shard.heads} == set(shard.kv_heads)
    assert [list(Shard(_spec(kv_heads=4), r, 2).kv_heads) for r in range(2)] == [[0, 1], [2, 3]]


def test_vocab_rows_cover_the_vocabulary_once_with_padding_on_the_last_rank():
    shards = [Shard(_spec(vocab=259), r, 4) for r in range(4)]
    assert {s.vocab_rows for s in shards} == {65}
    assert [t for s in shards for t in s.vocab] == list(range(259))
    assert len(shards[-1].vocab) == 64


@pytest.mark.parametrize(
    ("shape", "field"),
    [
        ({"heads": 6}, "num_attention_heads"),
        ({"intermediate": 66}, "intermediate_size"),
        ({"kv_heads": 3, "heads": 12}, "num_key_value_heads"),
    ],
)
def test_a_shape_that_does_not_split_names_its_field(shape, field):
    with pytest.raises(TensorParallelError, match=field):
        Shard(_spec(**shape), 0, 4)


def test_a_step_packs_into_ints_and_back():
    passes = [
        DecodeGraphPass([5, 6], [9, 3], [72, 24], [[9], [3, 4]], [10, 4]),
        PromptGraphPass([1, 2, 3], [0, 1, 2]),
        EagerPass([7, 8, 9], [0, 1, 4], [8, 9, 33], [2], [2], None, [[4, 0]], [5], [1, 2]),
        EagerPass([1], [4], [12], [1], [5], [[1]], [], [], []),
    ]
    assert unpack(pack(passes)) == passes


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(37)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 9, 27)]


@pytest.mark.parametrize(("variant", "tp"), [("llama", 2), ("qwen2", 4)])
def test_sharded_engine_equals_hf_and_its_pages_equal_the_unsharded_pages(tiny_checkpoints, tmp_path, variant, tp):
    """qwen2 at tp=4 has 2 KV heads: each is replicated on 2 ranks. A 16-token budget chunks the longest prompt, so
    a follower also runs passes that read earlier chunks' pages through the block tables."""
    model_dir = tiny_checkpoints[variant]
    config = EngineConfig(
        RunnerConfig(str(model_dir), device="cpu", num_kv_blocks=32, block_size=4, max_batch_tokens=16),
        load_tokenizer=False,
    )
    greedy = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    seeded = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, temperature=0.9, seed=5)
    prompts = _prompts()
    params = [greedy] * len(prompts) + [seeded]  # the last prompt again, sampled on the leader
    with offline_engine(config, tp, functools.partial(save_rank_state, directory=str(tmp_path))) as engine:
        got = [r.token_ids for r in engine.generate([*prompts, prompts[-1]], params)]
        ranks = [rank_state(engine.runner)]
    ranks += [torch.load(tmp_path / f"rank{r}.pt") for r in range(1, tp)]
    assert got[:-1] == hf_greedy_reference(model_dir, prompts, MAX_NEW)

    whole = Engine(config)
    assert [r.token_ids for r in whole.generate([*prompts, prompts[-1]], params)] == got
    assert got[-1] != got[-2]  # sampled, not greedy
    unsharded = rank_state(whole.runner)
    # Each rank holds its share; KV heads replicated at kv_heads < tp and the norms add a little.
    assert all(r["param_bytes"] < 1.3 * unsharded["param_bytes"] / tp for r in ranks)
    # By head, the ranks' caches are the unsharded cache (the same blocks, as the scheduler is the same), and so are
    # the replicas of a KV head. Not bit for bit: the row-parallel sums add in another order, and a matmul's rounding
    # depends on the shape of the rank's fused weight.
    by_head: dict[int, torch.Tensor] = {}
    for r in ranks:
        for i, head in enumerate(r["kv_heads"]):
            pages = r["kv_cache"][..., i, :]
            if head in by_head:
                torch.testing.assert_close(by_head[head], pages, rtol=1e-5, atol=1e-5)
            by_head[head] = pages
    assert sorted(by_head) == list(range(whole.spec.num_kv_heads))
    stacked = torch.stack([by_head[h] for h in sorted(by_head)], dim=-2)
    torch.testing.assert_close(stacked, unsharded["kv_cache"], rtol=1e-5, atol=1e-5)
    assert unsharded["kv_cache"].abs().sum() > 0


@pytest.mark.parametrize(("size", "message"), [("3", "num_attention_heads 4"), ("0", "tensor_parallel_size")])
def test_generate_refuses_a_size_the_model_does_not_split_into_before_starting_ranks(
    tiny_model_dir, capsys, size, message
):
    from splitserve.cli import main

    args = ["generate", "--model", str(tiny_model_dir), "--token-ids", "1,2", "--device", "cpu"]
    assert main([*args, "--tensor-parallel-size", size]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_ranks_replay_graphs_with_their_all_reduces_and_equal_the_cpu_engine(tiny_checkpoints):
    """nccl collectives captured in the decode and prompt graphs of both ranks; float32, so tokens are exact."""
    model_dir = str(tiny_checkpoints["llama"])
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    want = [
        r.token_ids for r in Engine(EngineConfig(RunnerConfig(model_dir, device="cpu"))).generate(_prompts(), params)
    ]
    config = EngineConfig(RunnerConfig(model_dir, device="cuda", dtype="float32", num_kv_blocks=64), max_batch_size=8)
    with offline_engine(config, 2) as engine:
        assert [r.token_ids for r in engine.generate(_prompts(), params)] == want
        graphs, prompt_graphs = engine.runner.graphs, engine.runner.prompt_graphs
        assert graphs is not None and graphs.replays > 0
        assert prompt_graphs is not None and prompt_graphs.replays > 0


def test_a_follower_killed_fails_the_leaders_next_step_naming_the_rank(tiny_model_dir):
    """No hang: the leader's next collective fails once a rank is gone, and the error says which one and how."""
    import multiprocessing
    import os
    import signal

    config = EngineConfig(RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=16), load_tokenizer=False)
    with pytest.raises(RuntimeError, match="rank 1 with exit code -9"), offline_engine(config, 2) as engine:
        (follower,) = multiprocessing.active_children()
        os.kill(follower.pid, signal.SIGKILL)
        follower.join()
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
