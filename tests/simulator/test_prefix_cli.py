"""``splitserve simulate --multiturn``: conversations from a trace, reported per turn."""

from __future__ import annotations

import json

from splitserve.simulator.cli import main
from tests.simulator.conftest import PROFILES

PROFILE = str(PROFILES / "llama3-8b-h100.yaml")


def test_simulate_multiturn_reports_every_turn(tmp_path, capsys):
    trace = tmp_path / "conv.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,800,100\n1,1200,150\n2,300,60\n")
    argv = ["simulate", "--profile", PROFILE, "--multiturn", "--trace", str(trace), "--conversations", "20"]
    argv += ["--turns", "3", "--think", "exponential:2", "--router", "cache_aware", "--prefill", "2", "--decode", "2"]
    outputs = []
    for run in range(2):
        out = tmp_path / f"run{run}.json"
        assert main([*argv, "--json", str(out)]) == 0
        outputs.append(json.loads(out.read_text()))
    assert outputs[0] == outputs[1]  # the same seed: the same conversations and the same run
    turns = outputs[0]["per_turn"]
    assert [t["turn"] for t in turns] == [0, 1, 2] and all(t["requests"] == 20 for t in turns)
    assert turns[0]["hit_rate"] == 0 and turns[0]["computed_tokens"] == turns[0]["prompt_tokens"]
    assert all(0 < t["hit_rate"] < 1 and t["computed_tokens"] < t["prompt_tokens"] for t in turns[1:])
    assert outputs[0]["metrics"]["requests"] == 60
    assert "hit rate" in capsys.readouterr().out


def test_simulate_multiturn_needs_a_trace(capsys):
    assert main(["simulate", "--profile", PROFILE, "--multiturn"]) == 2
    assert "--trace" in capsys.readouterr().err


def test_plan_multiturn_plans_for_the_conversations(tmp_path, capsys):
    trace = tmp_path / "conv.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,800,100\n1,1200,150\n")
    argv = ["plan", "--profile", PROFILE, "--multiturn", "--trace", str(trace), "--conversations", "10"]
    argv += ["--turns", "2", "--router", "cache_aware", "--max-gpus", "2", "--chunk-sizes", "2048"]
    out = tmp_path / "plan.json"
    assert main([*argv, "--json", str(out)]) == 0
    assert capsys.readouterr().out.startswith("10 conversations, 20 requests")
    assert json.loads(out.read_text())["recommended"]["policy"] == "cache_aware"
    assert main([*argv, "--sweep-rates", "1,2"]) == 2
    assert "--sweep-rates" in capsys.readouterr().err
