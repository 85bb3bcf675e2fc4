"""The conversation builder and the per-turn report, without a cluster."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from splitserve.bench.multiturn import MultiTurnSpec, ThinkDist, build_conversations
from splitserve.bench.multiturn_load import OK, TurnRecord
from splitserve.bench.multiturn_report import PolicyRun, format_table, summarize_turns
from splitserve.cli import main
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.workload import LengthDist

ROWS = [(100, 7), (200, 11), (300, 13), (400, 17), (50, 19)]


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "conv.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:15:{i:02d}.0000000,{p},{g}" for i, (p, g) in enumerate(ROWS)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def spec(trace: str, **kw) -> MultiTurnSpec:
    return MultiTurnSpec(trace=trace, conversations=6, turns=LengthDist("uniform", 2, 5), **kw)


def test_lengths_come_from_trace_rows(trace):
    conversations = build_conversations(spec(trace, followup_fraction=0.1), max_context=10**6)
    by_output = {g: p for p, g in ROWS}
    assert len(conversations) == 6
    for c in conversations:
        assert 2 <= len(c.turns) <= 5
        for k, turn in enumerate(c.turns):
            prompt = by_output[turn.max_tokens]  # the answer length picks the row (outputs are distinct)
            assert len(turn.message_ids) == (prompt if k == 0 else round(prompt * 0.1))
            assert all(0 <= t < 256 for t in turn.message_ids)


def test_the_same_seed_builds_the_same_conversations_and_another_does_not(trace):
    a = build_conversations(spec(trace), max_context=10**6)
    assert a == build_conversations(spec(trace), max_context=10**6)
    assert a != build_conversations(spec(trace, seed=1), max_context=10**6)


def test_each_prompt_starts_with_the_previous_prompt_and_answer(trace):
    (c, *_) = build_conversations(spec(trace), max_context=10**6)
    answers = [[1000 + 10 * k + i for i in range(t.max_tokens)] for k, t in enumerate(c.turns)]
    prompts = [c.prompt(k, answers) for k in range(len(c.turns))]
    for k in range(1, len(c.turns)):
        previous = prompts[k - 1] + answers[k - 1]
        assert prompts[k][: len(previous)] == previous
        assert prompts[k][len(previous) :] == c.turns[k].message_ids
    with pytest.raises(ValueError, match="answers"):
        c.prompt(2, answers[:1])


def test_a_conversation_stops_before_the_turn_that_does_not_fit(trace):
    limit = 450
    for c in build_conversations(spec(trace), max_context=limit):
        context = sum(len(t.message_ids) + t.max_tokens for t in c.turns)
        assert context <= limit
    with pytest.raises(SimInputError, match="--max-context"):
        build_conversations(spec(trace), max_context=10)


def test_think_times_follow_their_distribution():
    rng = np.random.default_rng(0)
    assert ThinkDist.parse("2.5", "--think").sample(rng) == 2.5
    draws = [ThinkDist.parse("uniform:1:2", "--think").sample(rng) for _ in range(200)]
    assert all(1 <= d <= 2 for d in draws)
    mean = np.mean([ThinkDist.parse("exponential:3", "--think").sample(rng) for _ in range(4000)])
    assert 2.7 < mean < 3.3
    for bad in ("uniform:2:1", "-1", "poisson:3", "exponential"):
        with pytest.raises(SimInputError, match="--think"):
            ThinkDist.parse(bad, "--think")


def test_bad_spec_values_name_their_flag(trace):
    with pytest.raises(SimInputError, match="--conversations"):
        spec(trace).__class__(trace=trace, conversations=0)
    with pytest.raises(SimInputError, match="--followup-fraction"):
        spec(trace, followup_fraction=0)


def record(c: int, k: int, ttft: float, prefill: str, decode: str, status: str = OK, cached: int = 0) -> TurnRecord:
    prompt = 10 + 5 * k
    base = TurnRecord(c, k, 0.0, prompt, prompt - 5 if k else 0, 3, status, 3, ttft, ttft + 1, 0.5, prefill, decode)
    return replace(base, cached_prompt_tokens=cached, kv_transfer_bytes=100 * (prompt - cached))


def test_the_per_turn_summary_counts_affinity_to_the_previous_turns_workers():
    records = [
        record(0, 0, 10, "p0", "d0"),
        record(0, 1, 20, "p0", "d1", cached=8),
        record(1, 0, 30, "p1", "d1"),
        record(1, 1, 40, "p0", "d1"),
        record(2, 0, 50, "p1", "d0"),
        record(2, 1, 0, "p1", "d0", status="unavailable"),
    ]
    first, second = summarize_turns(records)
    assert (first.turn, first.requests, first.ok, first.same_prefill_worker) == (0, 3, 3, None)
    assert first.ttft_ms["p50"] == 30
    assert (second.requests, second.ok) == (3, 2)
    assert second.same_prefill_worker == 0.5  # conversation 0 stayed on p0, conversation 1 moved
    assert second.same_decode_worker == 0.5
    assert (second.prompt_tokens, second.new_tokens, second.reused_tokens) == (15, 5, 10)
    assert second.ttft_ms["p50"] == 30  # the failed turn's latency is not counted
    # Over the ok turns only: prompts of 15 tokens, 8 of one of them cached.
    assert (second.computed_tokens, second.hit_rate) == (11, 8 / 30)
    # The oracle finds each ok turn's previous 10 tokens cached, less the last one: 9 of 15, twice.
    assert (first.oracle_hit_rate, second.oracle_hit_rate) == (0, 18 / 30)
    assert (second.kv_bytes, second.kv_bytes_per_new_token) == (1100, 2200 / 10)
    assert (first.hit_rate, first.kv_bytes_per_new_token) == (0, 100)
    table = format_table([PolicyRun("jsq", 1.0, records)])
    assert "2/3" in table and "27%" in table and "60%" in table and "KV B/new tok" in table


def test_bad_multiturn_flags_exit_2_naming_the_flag(trace, capsys):
    assert main(["bench", "--address", "127.0.0.1:1", "--multiturn"]) == 2
    assert "--trace" in capsys.readouterr().err
    argv = ["bench", "--address", "127.0.0.1:1", "--multiturn", "--trace", trace, "--think", "soon"]
    assert main(argv) == 2
    assert "--think" in capsys.readouterr().err


def test_the_benchmark_script_names_an_old_policys_new_name(trace):
    root = Path(__file__).resolve().parents[2]
    argv = [
        sys.executable,
        str(root / "benchmarks" / "multiturn.py"),
        "--config",
        str(root / "configs" / "tiny-cpu.yaml"),
    ]
    argv += ["--trace", trace, "--policies", "jsq,mixed"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--policies: 'mixed'" in done.stderr and "borrow_idle" in done.stderr
