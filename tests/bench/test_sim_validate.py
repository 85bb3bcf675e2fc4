"""Simulator validation end to end: a quick CPU profile of the tiny model, then the same requests live and simulated.
CPU timings are noise, so this checks the pipeline and the report, not the accuracy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from splitserve.bench.validate import METRICS, cluster_spec, main
from splitserve.cli import main as splitserve_main
from splitserve.config import ServingMode, load_config
from splitserve.simulator import load_profile
from tests.support import tiny_cluster_config

pytestmark = pytest.mark.slow


def test_predicted_and_measured_side_by_side(ray_local, tiny_model_dir, tmp_path, capsys):
    config = tiny_cluster_config(tiny_model_dir)
    config_path, profile_path = tmp_path / "cluster.yaml", tmp_path / "profile.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert splitserve_main(["profile", str(config_path), "--out", str(profile_path), "--quick"]) == 0

    cluster = cluster_spec(config, ServingMode.disaggregated, load_profile(profile_path))
    assert (cluster.mode, cluster.kv_backend, cluster.prefill.max_batch_tokens) == ("disaggregated", "grpc", 256)
    assert cluster.decode is not None and cluster.decode.max_batch_size == 16
    assert cluster_spec(config, ServingMode.colocated, load_profile(profile_path)).pools.keys() == {"colocated"}
    assert not cluster.shared_gpus  # a CPU cluster: no GPU to share

    workload = ["--num-requests", "6", "--prompt-len", "uniform:8:48", "--output-len", "uniform:4:10", "--seed", "2"]
    argv = ["--config", str(config_path), "--profile", str(profile_path), "--rates", "2", *workload]
    out_dir = tmp_path / "out"
    assert main([*argv, "--warmup", "1", "--timeout", "60", "--out-dir", str(out_dir), "--fit-serving"]) == 0

    out = capsys.readouterr().out
    assert "TTFT p50 ms" in out and "predicted/measured" in out
    saved = json.loads((tmp_path / "out" / "sim_validate.json").read_text())
    assert saved["argv"][1:3] == ["--config", str(config_path)] and saved["date"] and saved["device"]
    assert saved["mode"] == "disaggregated" and saved["goal"] == {"max_relative_error": 0.1}
    # The fit's overheads are never negative (how large they are on a CPU is timing noise), and ship in a profile.
    assert saved["serving_fitted_on_rate"] == 2.0
    assert min(saved["serving"]["request_s"], saved["serving"]["step_s"]) >= 0
    assert load_profile(out_dir / "profile_fitted.yaml").serving.model_dump() == saved["serving"]
    (run,) = saved["runs"]
    assert run["rate"] == 2.0 and run["measured"]["sent"] == run["measured"]["ok"] == 6
    assert run["predicted"]["requests"] == 6
    # Each request, measured and predicted, for a look at which ones the model misses; the run's clock window.
    assert [r["index"] for r in run["records"]] == list(range(6))
    predicted = run["predicted_per_request"]
    assert len(predicted["ttft_ms"]) == len(predicted["tpot_ms"]) == 6 and all(t > 0 for t in predicted["ttft_ms"])
    assert np.median(predicted["ttft_ms"]) == pytest.approx(run["metrics"]["ttft_p50_ms"]["predicted"])
    assert run["clock_s"][0] < run["clock_s"][1]
    for key in METRICS:
        fig = run["metrics"][key]
        measured, predicted = fig["measured"], fig["predicted"]
        assert math.isfinite(measured) and measured > 0, key
        assert math.isfinite(predicted) and predicted > 0, key
        assert fig["ratio"] == pytest.approx(predicted / measured), key
        assert fig["within_goal"] == (abs(fig["ratio"] - 1) <= 0.1)

    # Re-predicted from the file, no cluster: the fitted profile gives the same predictions, the fit the same fit.
    again = tmp_path / "again"
    repredict = ["--measured", str(out_dir / "sim_validate.json"), "--out-dir", str(again)]
    assert main([*repredict, "--profile", str(out_dir / "profile_fitted.yaml")]) == 0
    redone = json.loads((again / "sim_validate.json").read_text())
    assert redone["measured_from"] == str(out_dir / "sim_validate.json") and redone["device"] == saved["device"]
    assert redone["runs"] == saved["runs"] and redone["workload"] == saved["workload"]
    assert main([*repredict, "--profile", str(profile_path), "--fit-serving"]) == 0
    refit = json.loads((again / "sim_validate.json").read_text())
    assert refit["serving"] == saved["serving"] and refit["runs"] == saved["runs"]
    assert main(["--measured", str(again / "sim_validate.json"), "--profile", str(profile_path)]) == 2
    assert "itself a re-prediction" in capsys.readouterr().err


def test_pools_on_fractions_of_too_few_gpus_share_them():
    """The 1-GPU 1P1D benchmark config: a prefill and a decode worker at half the GPU each."""
    config = load_config("benchmarks/configs/llama3-8b-random-1gpu.yaml")
    profile = load_profile("configs/profiles/llama3-8b-h200.yaml")
    shared = cluster_spec(config, ServingMode.disaggregated, profile)
    assert shared.shared_gpus and shared.gpus == 1
    two = config.model_copy(update={"cluster": config.cluster.model_copy(update={"total_gpus": 2})})
    assert not cluster_spec(two, ServingMode.disaggregated, profile).shared_gpus  # room for each on a GPU
