"""The step trace: one line per engine step with its shape, silent while off, read back as written."""

from __future__ import annotations

import pytest

from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams, step_trace


def _engine(model_dir, overlap: bool) -> Engine:
    runner = RunnerConfig(str(model_dir), device="cpu", num_kv_blocks=64, block_size=8, max_batch_tokens=64)
    return Engine(EngineConfig(runner, overlap_decode=overlap))


def test_nothing_is_written_while_off(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(step_trace._trace, "directory", None)
    _engine(tiny_model_dir, overlap=False).generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overlap", [False, True])
def test_each_step_is_one_record_of_what_it_launched(tiny_model_dir, tmp_path, monkeypatch, overlap):
    monkeypatch.setattr(step_trace._trace, "directory", str(tmp_path))
    engine = _engine(tiny_model_dir, overlap)
    prompts = [[5] * 40, [6] * 30]  # 70 tokens over a 64-token budget: the second prompt is chunked
    engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    steps = step_trace.load(tmp_path)
    assert len(steps) == engine.step_times.steps and {s.pid for s in steps} == {next(iter(steps)).pid}
    assert [s.start for s in steps] == sorted(s.start for s in steps)
    assert all(s.seconds >= s.device_wait_s >= 0 for s in steps)
    # Every prompt token and decode row computed is in exactly one record.
    assert sum(s.prefill_tokens for s in steps) == 70
    first, second = steps[0], steps[1]
    assert (first.prefill_tokens, first.prefill_seqs, first.decodes, first.kind) == (64, 2, 0, "prefill")
    assert (second.prefill_tokens, second.prefill_seqs) == (6, 1) and second.decodes == 1 and second.kind == "mixed"
    # Three tokens to decode after the first for each prompt (overlap computes none past max_tokens).
    assert sum(s.decodes for s in steps) == 2 * 3
    decode_steps = [s for s in steps if s.kind == "decode"]
    assert decode_steps and all(s.decode_context >= s.decodes * 31 for s in decode_steps)
    assert any(s.read_back for s in steps) == overlap


def test_a_line_cut_short_is_skipped(tmp_path):
    (tmp_path / f"{step_trace.PREFIX}7.log").write_text("1.0 0.01 0.005 16 1 0 0 0\n2.0 0.01 0.0\n")
    (tmp_path / "123.log").write_text("not a step trace\n")
    (step,) = step_trace.load(tmp_path)
    assert (step.pid, step.start, step.prefill_tokens, step.kind, step.read_back) == (7, 1.0, 16, "prefill", False)
