"""``splitserve profile``: the fits on synthetic numbers, then one real quick run on the tiny model on CPU whose
YAML the simulator must accept."""

from __future__ import annotations

import pytest
import yaml

from splitserve.cli import main
from splitserve.engine.testing import tiny_config_dict
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.hardware import gpu_slug
from splitserve.simulator.measure import (
    QUICK,
    DecodePoint,
    MixedPoint,
    fit_decode,
    fit_mixed,
    fit_transfer,
    prefill_ladder,
    split_prompts,
)
from splitserve.simulator.profile import MixedSpec, load_profile
from splitserve.simulator.profile_run import render, write_checked
from tests.simulator.conftest import make_profile

KV_BLOCKS, BLOCK, BATCH_TOKENS = 256, 16, 512


def test_prefill_ladder_is_dense_at_the_bottom_and_ends_at_the_budget():
    assert prefill_ladder(2048) == [1, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert prefill_ladder(2048, stride=2) == [1, 16, 64, 256, 1024, 2048]
    assert prefill_ladder(3000)[-2:] == [2048, 3000]
    assert split_prompts(5000, 2047) == [2047, 2047, 906]
    assert split_prompts(512, 2047) == [512]


def test_gpu_names_as_profiles_spell_them():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("Tesla T4") == "tesla-t4"


def test_decode_fit_recovers_a_linear_model_and_keeps_costs_nonnegative():
    base, per_seq, per_token = 0.005, 2e-5, 5e-8
    grid = [(b, c) for b in (1, 8, 32) for c in (128, 1024)]
    exact = [DecodePoint(b, c, base + per_seq * b + per_token * b * (c + 1)) for b, c in grid]
    spec, worst = fit_decode(exact)
    assert spec.base_s == pytest.approx(base, rel=1e-6)
    assert spec.per_seq_s == pytest.approx(per_seq, rel=1e-6)
    assert spec.per_context_token_s == pytest.approx(per_token, rel=1e-6)
    assert worst < 1e-6
    # Step time falling with batch size is noise: the fit drops that term rather than return a negative cost.
    falling = [DecodePoint(b, c, 0.01 - 1e-5 * b + 1e-8 * b * c) for b, c in grid]
    spec, _ = fit_decode(falling)
    assert spec.per_seq_s == 0 and spec.base_s > 0 and spec.per_context_token_s >= 0
    with pytest.raises(ValueError, match="at least 3"):
        fit_decode(exact[:2])


def test_mixed_fit_finds_the_host_bound_floor_and_the_excess_of_a_device_bound_step():
    decode = fit_decode([DecodePoint(b, c, 0.005 + 1e-4 * b) for b in (1, 8, 32) for c in (128, 1024)])[0]
    ladder, seconds = [1, 1000, 2000], [0.01, 0.02, 0.04]
    # Short chunks cost the floor (25 ms) whatever their prefill; long ones their prefill + 2 ms.
    points = [MixedPoint(100, 4, 64, 0.025), MixedPoint(500, 8, 64, 0.025), MixedPoint(1, 60, 64, 0.025)]
    points += [MixedPoint(1496, 4, 64, 0.032), MixedPoint(1992, 8, 64, 0.042)]
    spec, modelled = fit_mixed(points, ladder, seconds, decode)
    # the longer of prefill(chunk + decodes) and the decode step: 60 decodes beside a 1-token chunk, decode's 11 ms
    assert modelled == pytest.approx([0.01 + 103e-2 / 999, 0.01 + 507e-2 / 999, 0.011, 0.03, 0.04], abs=1e-6)
    assert spec.floor_s == pytest.approx(0.025) and spec.extra_s == pytest.approx(0.002)
    # One extra alone cannot fit both kinds of step; with the floor they fit exactly.
    assert [max(m + spec.extra_s, spec.floor_s) for m in modelled] == pytest.approx([p.seconds for p in points])
    faster = [MixedPoint(998, 2, 64, 0.015)]  # noise: a mixed step is never cheaper than its parts
    assert fit_mixed(faster, ladder, seconds, decode)[0] == MixedSpec()
    assert fit_mixed([], ladder, seconds, decode)[0] == MixedSpec()


def test_transfer_fit_through_two_sizes():
    spec = fit_transfer(1_000, 0.001 + 1_000 / 1e9, 1_000_000, 0.001 + 1_000_000 / 1e9)
    assert spec.latency_s == pytest.approx(0.001)
    assert spec.bandwidth_bytes_per_s == pytest.approx(1e9)
    noisy = fit_transfer(1_000, 0.002, 1_000_000, 0.0015)  # the large transfer came out faster
    assert noisy.bandwidth_bytes_per_s == pytest.approx(1_000_000 / 0.0015)
    assert 0 <= noisy.latency_s < 0.002


def test_a_profile_is_written_only_if_it_loads(tmp_path):
    out = tmp_path / "p.yaml"
    written, toy = write_checked(render(make_profile(), ["measured here"]), out), make_profile()
    assert written.decode == toy.decode and written.kv_transfer == toy.kv_transfer
    assert written.prefill.seconds == pytest.approx(toy.prefill.seconds, rel=1e-3)  # kept to 4 significant digits
    assert out.read_text().startswith("# measured here\nmodel: toy\n")
    good = out.read_text()
    with pytest.raises(SimInputError, match="decode"):
        write_checked(good.replace("base_s: 0.005", "base_s: -1"), out)
    assert out.read_text() == good and [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


def _config(tmp_path, device: str = "cpu", batch_tokens: int = BATCH_TOKENS, batch_size: int = 16):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "tiny", "name": "tiny", "dtype": "float32"},
                "cluster": {"device": device},
                "prefill": {"max_batch_tokens": batch_tokens},
                "decode": {"num_kv_blocks": KV_BLOCKS, "max_batch_size": batch_size},
                "kv_cache": {"block_size": BLOCK},
            }
        )
    )
    return str(path)


def test_bad_input_is_one_line_before_anything_loads(tmp_path, capsys):
    out = str(tmp_path / "p.yaml")
    assert main(["profile", str(tmp_path / "missing.yaml"), "--out", out]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["profile", _config(tmp_path), "--out", out, "--power-w", "0"]) == 2
    assert "--power-w: must be > 0" in capsys.readouterr().err
    assert main(["profile", _config(tmp_path), "--out", out, "--nccl", "0.001", "0"]) == 2
    assert "--nccl" in capsys.readouterr().err
    # No GPU here (or, on a GPU, no price for it): either way it stops before loading the model.
    assert main(["profile", _config(tmp_path, device="cuda"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "sees no GPU" in err or "--cost-per-hour: required" in err
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.slow
def test_a_decode_pool_too_small_to_fit_the_model_is_a_config_error(tmp_path, capsys):
    config = _config(tmp_path, batch_tokens=16, batch_size=1)  # batch 1 only: two grid points
    assert main(["profile", config, "--out", str(tmp_path / "p.yaml"), "--quick"]) == 2
    assert "fix: raise decode.max_batch_size" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One quick profile of the tiny model on CPU, through the CLI, with an nccl figure given as a measured one."""
    tmp = tmp_path_factory.mktemp("profile")
    out = tmp / "profiles" / "tiny-cpu.yaml"
    argv = ["profile", _config(tmp), "--out", str(out), "--quick", "--cost-per-hour", "1.5"]
    assert main([*argv, "--nccl", "0.0005", "2e10"]) == 0
    return out


@pytest.mark.slow
def test_quick_cpu_profile_of_the_tiny_model(measured, capsys):
    profile = load_profile(measured)
    assert profile.model == "tiny"
    assert (profile.gpu.name, profile.gpu.cost_per_hour, profile.gpu.power_w) == ("cpu", 1.5, 1.0)
    cfg = tiny_config_dict()
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert profile.kv_bytes_per_token == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
    assert profile.kv_capacity_tokens == KV_BLOCKS * BLOCK
    tokens, seconds = profile.prefill.tokens, profile.prefill.seconds
    assert tokens[0] == 1 and tokens[-1] == BATCH_TOKENS
    assert all(s > 0 for s in seconds) and seconds == sorted(seconds) and seconds[-1] > seconds[0]
    # A step costs something; how the fit splits it between base and per-sequence is up to the (noisy) CPU.
    assert profile.decode.base_s + profile.decode.per_seq_s > 0
    assert set(profile.kv_transfer) == {"local", "grpc", "tcp", "nccl"}
    assert all(t.bandwidth_bytes_per_s > 0 for t in profile.kv_transfer.values())
    assert (profile.kv_transfer["nccl"].latency_s, profile.kv_transfer["nccl"].bandwidth_bytes_per_s) == (5e-4, 2e10)
    header = measured.read_text().split("\nmodel:")[0]
    assert header.startswith("# Measured by `splitserve profile` on ")
    assert "--quick" in header and "nccl: given on the command line" in header
    assert "1.5 $/h (given); power 1 W (placeholder)" in header
    # the measured decode grid is kept next to its fit, at each run's middle context
    assert f"context {64 + QUICK.decode_steps // 2}: batch 1 " in header
    assert "Measured (tokens: ms): 1: " in header and "\n# decode: mean of" in header  # each note on its line
    # mixed steps measured beside each decode count of the quick sweep, and the fitted term kept
    assert all(f"#   {n} decode(s): chunk {QUICK.mixed_chunks[0]} " in header for n in QUICK.mixed_decodes)
    assert profile.mixed.extra_s >= 0


@pytest.mark.slow
def test_the_simulator_runs_on_a_measured_profile(measured, capsys):
    workload = ["--rate", "2", "--num-requests", "40", "--prompt-len", "200", "--output-len", "8", "--seed", "3"]
    for backend in ("grpc", "nccl"):
        assert main(["simulate", "--profile", str(measured), "--kv-backend", backend, *workload]) == 0
        assert "40 requests over" in capsys.readouterr().out
    assert main(["simulate", "--profile", str(measured), "--kv-backend", "cuda_ipc", *workload]) == 2
    assert "'cuda_ipc' is not in the profile" in capsys.readouterr().err
