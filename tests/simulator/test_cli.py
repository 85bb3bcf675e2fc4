from __future__ import annotations

import json

import pytest

from splitserve.engine.testing import tiny_config_dict
from splitserve.simulator.cli import main
from splitserve.simulator.profile import load_profile
from tests.simulator.conftest import PROFILES

H100 = str(PROFILES / "llama3-8b-h100.yaml")
H200 = str(PROFILES / "llama3-8b-h200.yaml")
SMALL = ["--rate", "10", "--num-requests", "300", "--seed", "1"]


def test_simulate_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["simulate", "--profile", H100, *SMALL, "--prefill", "1", "--decode", "2", "--json", str(out)]) == 0
    assert "1xTP1 h100-sxm P + 2xTP1 h100-sxm D" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["cluster"]["gpus"] == 3
    m = data["metrics"]
    assert m["requests"] == 300
    assert m["ttft_s"]["p50"] <= m["ttft_s"]["p90"] <= m["ttft_s"]["p99"]
    assert 0 <= m["slo_attainment"] <= 1


def test_simulate_a_prefill_and_a_decode_replica_sharing_one_gpu(tmp_path, capsys):
    out = tmp_path / "run.json"
    args = ["simulate", "--profile", H200, *SMALL, "--kv-backend", "local", "--shared-gpus"]
    assert main([*args, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["cluster"]["gpus"] == 1 and data["cluster"]["shared_gpus"] is True
    assert main(["simulate", "--profile", H200, *SMALL, "--decode", "2", "--shared-gpus"]) == 2
    assert "--shared-gpus: pairs one prefill and one decode replica per GPU" in capsys.readouterr().err


def test_plan_with_two_gpu_types_and_plots(tmp_path, capsys):
    args = [
        "plan",
        "--profile",
        H100,
        "--profile",
        H200,
        *SMALL,
        "--max-gpus",
        "3",
        "--sweep-rates",
        "5,10",
        "--plot-dir",
        str(tmp_path),
        "--json",
        str(tmp_path / "plan.json"),
    ]
    assert main(args) == 0
    assert "recommended:" in capsys.readouterr().out
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0
    assert (tmp_path / "goodput_vs_load.png").stat().st_size > 0
    assert json.loads((tmp_path / "plan.json").read_text())["recommended"]["gpus"] <= 3


def test_trace_input(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{i * 0.1},{100 + i},{10}\n" for i in range(50))
    )
    assert main(["simulate", "--profile", H100, "--trace", str(trace), "--mode", "colocated"]) == 0
    assert "colocated" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--profile", "/nonexistent.yaml", "--rate", "1"], "--profile"),
        (["--profile", H100, "--rate", "0"], "--rate"),
        (["--profile", H100, "--rate", "-3"], "--rate"),
        (["--profile", H100], "--rate"),
        (["--profile", H100, "--rate", "1", "--prompt-len", "lognormal:x"], "--prompt-len"),
        (["--profile", H100, "--rate", "1", "--kv-backend", "carrier-pigeon"], "--kv-backend"),
        (["--profile", H100, "--rate", "1", "--tpot-ms", "0"], "--tpot-ms"),
        (["--profile", H100, "--trace", "BAD_COLUMNS"], "ContextTokens"),
        (["--profile", H100, "--rate", "1", "--router", "mixed"], "--router borrow_idle"),
        (["--profile", H100, "--rate", "1", "--router", "fastest"], "--router"),
        (["--profile", H100, "--rate", "1", "--mixed", "1"], "--hybrid 1"),
        (["--profile", H100, "--trace", "/nonexistent.csv"], "--trace"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, flag):
    if "BAD_COLUMNS" in extra:
        bad = tmp_path / "bad.csv"
        bad.write_text("time,prompt,output\n1,2,3\n")
        extra = [str(bad) if x == "BAD_COLUMNS" else x for x in extra]
    assert main(["simulate", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and flag in err and "Traceback" not in err


def test_plan_rejects_too_few_gpus(capsys):
    assert main(["plan", "--profile", H100, "--rate", "1", "--max-gpus", "1", "--modes", "disaggregated"]) == 2
    assert "--max-gpus" in capsys.readouterr().err


def test_registers_into_the_main_cli(capsys):
    from splitserve.cli import main as splitserve_main

    assert splitserve_main(["simulate", "--profile", H100, *SMALL]) == 0
    assert "h100-sxm" in capsys.readouterr().out


@pytest.mark.slow
def test_profile_at_tp_2_measures_the_engine_over_two_ranks(tmp_path, capsys):
    out = tmp_path / "tp2.yaml"
    assert main(["profile", "configs/tiny-cpu.yaml", "--out", str(out), "--quick", "--tp", "2"]) == 0
    profile = load_profile(out)
    assert profile.tensor_parallel_size == 2 and profile.prefill.seconds[-1] > 0
    assert "--tp 2" in out.read_text().split("\nmodel:")[0]
    cfg = tiny_config_dict()  # the whole model's KV per token, though each rank holds half of its heads
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert profile.kv_bytes_per_token == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4


def test_a_derived_profile_plans_beside_the_measured_one_and_the_plan_says_which_is_derived(tmp_path, capsys):
    (tmp_path / "llama3-8b-h100.yaml").write_text((PROFILES / "llama3-8b-h100.yaml").read_text())
    derive = ["derive-profile", H100, "--tp", "2", "--out", str(tmp_path / "tp2.yaml"), "--layers", "32"]
    derive += ["--hidden-size", "4096", "--kv-heads", "8", "--weight-bytes", "16.06e9"]
    assert main([*derive, "--link-latency-s", "1e-5", "--link-bandwidth", "3.6e11"]) == 0
    assert "derived, tp=2" in capsys.readouterr().out
    plan_json = tmp_path / "plan.json"
    args = ["plan", "--profile", str(tmp_path), *SMALL, "--max-gpus", "4", "--chunk-sizes", "512,8192"]
    assert main([*args, "--json", str(plan_json)]) == 0
    out = capsys.readouterr().out
    assert f"tp2.yaml: llama3-8b-random on h100-sxm x TP2, DERIVED from {H100}" in out
    assert "llama3-8b-h100.yaml: llama3-8b-random on h100-sxm x TP1, measured" in out
    data = json.loads(plan_json.read_text())
    assert sorted(p["tensor_parallel_size"] for p in data["profiles"]) == [1, 2]
    chunks = {
        e["cluster"]["pools"]["colocated"]["max_batch_tokens"]
        for e in data["tried"]
        if e["cluster"]["mode"] == "colocated"
    }
    assert chunks <= {512, 8192} and chunks
    for e in data["tried"]:
        assert e["cluster"]["gpus"] == sum(p["gpus"] for p in e["cluster"]["pools"].values()) <= 4


def test_a_derived_profile_needs_a_measured_tp1_source_and_sane_assumptions(tmp_path, capsys):
    base = ["derive-profile", H100, "--out", str(tmp_path / "x.yaml"), "--layers", "32", "--hidden-size", "4096"]
    base += ["--kv-heads", "8", "--weight-bytes", "16e9", "--link-latency-s", "1e-5", "--link-bandwidth", "3.6e11"]
    assert main([*base, "--tp", "1"]) == 2
    assert "--tp" in capsys.readouterr().err
    assert main([*base, "--tp", "2", "--prefill-efficiency", "1.5"]) == 2
    assert "--prefill-efficiency" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_simulate_takes_at_most_two_profiles(capsys):
    assert main(["simulate", "--profile", H100, "--profile", H200, "--profile", H100, *SMALL]) == 2
    assert "simulate takes one profile, or two" in capsys.readouterr().err
