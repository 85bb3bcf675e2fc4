"""A served decode step as the profile times it: consecutive engine.step calls over admitted requests, every token
computed, nothing leaked afterwards."""

from __future__ import annotations

import pytest

from splitserve.bench.engine_timing import admitted_for_decode, finish, served_decode_period
from splitserve.engine import Engine, EngineConfig, RunnerConfig


@pytest.mark.parametrize("overlap", [False, True])
def test_served_decode_period_steps_every_request_and_leaks_nothing(tiny_model_dir, overlap):
    runner = RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=64, block_size=8)
    engine = Engine(EngineConfig(runner, overlap_decode=overlap))
    seqs = admitted_for_decode(engine, batch=3, context=21, tag="t")
    assert [s.request_id for s in engine.running] == ["t-0", "t-1", "t-2"]
    lengths = [s.num_tokens for s in seqs]
    assert served_decode_period(engine, steps=5) > 0
    # one token per step for every request (the first step untimed), its KV computed up to the newest token
    assert [s.num_tokens for s in seqs] == [n + 6 for n in lengths]
    assert [s.num_computed_tokens for s in seqs] == [n + 5 for n in lengths]
    assert engine.running == seqs and engine.step_times.steps == 6
    finish(engine, seqs)
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_work()
