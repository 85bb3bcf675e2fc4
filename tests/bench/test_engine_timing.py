"""A served decode step as the profile times it: the whole engine.step, repeatable at one context, nothing leaked."""

from __future__ import annotations

from splitserve.bench.engine_timing import admitted_for_decode, served_decode_step
from splitserve.engine import Engine, EngineConfig, RunnerConfig


def test_served_decode_steps_stay_at_one_context_and_leak_nothing(tiny_model_dir):
    engine = Engine(EngineConfig(RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=64, block_size=8)))
    seqs = admitted_for_decode(engine, batch=3, context=21, tag="t")
    assert [s.request_id for s in engine.running] == ["t-0", "t-1", "t-2"]
    lengths = [s.num_tokens for s in seqs]
    step = served_decode_step(engine, seqs)
    for _ in range(5):
        step()
        # the same tokens in the cache every call, the sequences still running
        assert [s.num_tokens for s in seqs] == lengths
        assert [s.num_computed_tokens for s in seqs] == [n - 1 for n in lengths]
    assert engine.running == seqs
    for s in seqs:
        assert engine.abort(s.request_id)
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_work()
