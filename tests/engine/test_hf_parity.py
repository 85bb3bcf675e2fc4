"""The correctness oracle: greedy output of our engine equals HF transformers' greedy output on the same weights."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch

from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams
from splitserve.engine.testing import hf_greedy_reference

MAX_NEW = 12


def _prompts(seed: int, lengths=(1, 5, 17, 33, 70)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model_dir, prompts, max_new=MAX_NEW) -> list[list[int]]:
    return hf_greedy_reference(model_dir, prompts, max_new)


def _engine(model_dir, overlap: bool = False, **runner_kw) -> Engine:
    runner_kw.setdefault("num_kv_blocks", 256)
    runner_kw.setdefault("block_size", 8)
    return Engine(EngineConfig(RunnerConfig(str(model_dir), device="cpu", **runner_kw), overlap_decode=overlap))


GREEDY = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "mistral", "llama-tied", "llama3-rope"])
def test_batched_greedy_equals_hf(tiny_checkpoints, variant):
    model_dir = tiny_checkpoints[variant]
    prompts = _prompts(seed=zlib.crc32(variant.encode()))
    got = [r.token_ids for r in _engine(model_dir).generate(prompts, GREEDY)]
    assert got == _hf_greedy(model_dir, prompts)


@pytest.mark.parametrize("overlap", [False, True])
def test_chunked_prefill_and_preemption_stay_exact(tiny_model_dir, overlap):
    """A token budget smaller than the prompts and a cache too small for all at once: chunks and recompute (an
    overlapped engine falls back to ordinary steps for them)."""
    prompts = _prompts(seed=7, lengths=(40, 55, 3, 61))
    engine = _engine(tiny_model_dir, overlap, max_batch_tokens=16, num_kv_blocks=24, block_size=4)
    got = [r.token_ids for r in engine.generate(prompts, GREEDY)]
    assert got == _hf_greedy(tiny_model_dir, prompts)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prefix_cache_reuses_blocks_and_stays_exact(tiny_model_dir):
    system = _prompts(seed=3, lengths=(48,))[0]
    prompts = [system + tail for tail in _prompts(seed=4, lengths=(5, 9, 2))]
    engine = _engine(tiny_model_dir, block_size=8)
    first = engine.generate(prompts[:1], GREEDY)
    hits_before = engine.blocks.prefix_hits
    rest = engine.generate(prompts[1:], GREEDY)
    assert engine.blocks.prefix_hits - hits_before >= 2 * (48 // 8)  # both later prompts reuse the system blocks
    assert [r.token_ids for r in first + rest] == _hf_greedy(tiny_model_dir, prompts)


@pytest.mark.parametrize("overlap", [False, True])
def test_disaggregated_in_miniature(tiny_model_dir, overlap):
    """Prefill in one engine, copy the KV pages into a fresh engine's reserved pages, decode there."""
    prompts = _prompts(seed=11, lengths=(9, 30, 64))
    prefiller = _engine(tiny_model_dir, block_size=8)
    decoder = _engine(tiny_model_dir, overlap, block_size=8, num_kv_blocks=64)
    seqs = [prefiller.make_sequence(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    layers_done: list[int] = []
    firsts = prefiller.prefill(seqs, hook_for=lambda completing: layers_done.append)
    assert layers_done == list(range(prefiller.spec.num_layers))  # one pass, every layer reported in order
    for seq, first in zip(seqs, firsts, strict=True):
        target = decoder.make_sequence(seq.request_id, seq.prompt_token_ids, GREEDY)
        dst, cached = decoder.reserve(target)
        assert cached == 0  # a fresh decoder holds no prefix
        layers = [prefiller.runner.gather_pages(layer, seq.block_table) for layer in range(prefiller.spec.num_layers)]
        decoder.runner.scatter_layers(0, dst, torch.stack(layers))
        decoder.admit(seq.request_id, first.token_id)
        assert prefiller.release(seq.request_id)
    assert prefiller.blocks.num_free == prefiller.blocks.num_blocks
    outputs: dict[str, list[int]] = {f"r{i}": [f.token_id] for i, f in enumerate(firsts)}
    while decoder.has_work():
        for out in decoder.step():
            outputs[out.request_id].append(out.token_id)
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == _hf_greedy(tiny_model_dir, prompts)
    assert decoder.blocks.num_free == decoder.blocks.num_blocks


def _hand_over(
    prefiller: Engine, decoder: Engine, rid: str, prompt: list[int], meanwhile: Callable[[], None] = lambda: None
) -> tuple[int, int]:
    """One request the way the workers move it: prefilled, the decoder's reservation filled past the prefix its cache
    holds (only those pages copied), ``meanwhile`` run, admitted; its first token, and the tokens found cached."""
    seq = prefiller.make_sequence(rid, prompt, GREEDY)
    (first,) = prefiller.prefill([seq])
    dst, cached = decoder.reserve(decoder.make_sequence(rid, prompt, GREEDY))
    meanwhile()
    sent = seq.block_table[cached // 8 :]
    assert len(sent) == len(dst)
    layers = [prefiller.runner.gather_pages(layer, sent) for layer in range(prefiller.spec.num_layers)]
    decoder.runner.scatter_layers(0, dst, torch.stack(layers))
    decoder.admit(rid, first.token_id)
    assert prefiller.release(rid)
    return first.token_id, cached


def _decode_all(decoder: Engine, firsts: dict[str, int]) -> dict[str, list[int]]:
    outputs = {rid: [token] for rid, token in firsts.items()}
    while decoder.has_work():
        for out in decoder.step():
            outputs[out.request_id].append(out.token_id)
    return outputs


@pytest.mark.parametrize("overlap", [False, True])
def test_a_decoder_keeps_a_finished_turn_and_receives_only_the_next_turns_new_pages(tiny_model_dir, overlap):
    """Incremental transfer: turn 2 (turn 1's prompt, its answer, a new message) reuses the decoder's cached blocks
    of turn 1 and gets only the rest; its output equals a cold run's. Blocks held by a reservation survive any
    eviction pressure until admission; a prefix evicted before the reservation is simply transferred."""
    prefiller = _engine(tiny_model_dir, block_size=8)
    decoder = _engine(tiny_model_dir, overlap, block_size=8, num_kv_blocks=24)
    (turn1,) = _prompts(seed=21, lengths=(29,))
    first, cached = _hand_over(prefiller, decoder, "t1", turn1)
    answer = _decode_all(decoder, {"t1": first})["t1"]
    turn2 = turn1 + answer + _prompts(seed=22, lengths=(6,))[0]

    def evict_everything() -> None:  # between reservation and admission: every free block is taken and reused
        decoder.blocks.free(decoder.blocks.allocate(decoder.blocks.num_free))
        decoder.blocks.reset_prefix_cache()

    # Turn 1's prompt and all but its last answer token have KV on the decoder: 40 tokens, 5 full blocks.
    first2, cached2 = _hand_over(prefiller, decoder, "t2", turn2, meanwhile=evict_everything)
    assert (cached, cached2) == (0, 40)
    outputs = _decode_all(decoder, {"t2": first2})
    assert outputs["t2"] == _hf_greedy(tiny_model_dir, [turn2])[0]  # the reserved blocks were never taken
    # Evicted before the reservation, the prefix is simply transferred.
    evict_everything()
    first3, cached3 = _hand_over(prefiller, decoder, "t3", turn2)
    assert cached3 == 0 and _decode_all(decoder, {"t3": first3})["t3"] == outputs["t2"]
    assert decoder.blocks.num_free == decoder.blocks.num_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_requests_reserved_and_admitted_while_a_step_runs_decode_like_the_others(tiny_model_dir, overlap):
    """A decode worker reserves pages and admits requests while a step waits for the device (``Engine.device_wait``):
    they join the next step and decode exactly as HF does, and every page comes back."""
    prompts = _prompts(seed=12, lengths=(17, 40, 5))
    prefiller = _engine(tiny_model_dir, block_size=8)
    decoder = _engine(tiny_model_dir, overlap, block_size=8, num_kv_blocks=64)
    seqs = [prefiller.make_sequence(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    firsts = prefiller.prefill(seqs)
    arrivals = list(zip(seqs, firsts, strict=True))

    def hand_over() -> None:  # what the decode worker's reserve + landing + admit do, one request at a time
        seq, first = arrivals.pop(0)
        dst, _ = decoder.reserve(decoder.make_sequence(seq.request_id, seq.prompt_token_ids, GREEDY))
        layers = [prefiller.runner.gather_pages(layer, seq.block_table) for layer in range(prefiller.spec.num_layers)]
        decoder.runner.scatter_layers(0, dst, torch.stack(layers))
        decoder.admit(seq.request_id, first.token_id)
        assert prefiller.release(seq.request_id)

    calls_during_steps = 0

    def device_wait(wait: Callable[[], None]) -> None:
        nonlocal calls_during_steps
        calls_during_steps += 1
        if arrivals:
            hand_over()
        wait()

    hand_over()  # the first request before any step; the others arrive during the steps
    decoder.device_wait = device_wait
    outputs: dict[str, list[int]] = {f"r{i}": [f.token_id] for i, f in enumerate(firsts)}
    while decoder.has_work():
        for out in decoder.step():
            outputs[out.request_id].append(out.token_id)
    assert calls_during_steps >= 3 and not arrivals
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == _hf_greedy(tiny_model_dir, prompts)
    assert decoder.blocks.num_free == decoder.blocks.num_blocks
