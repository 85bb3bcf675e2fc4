"""The pieces of the ops commands that need no cluster: logs, the status table, job submission, Ray init, rates."""

import json
import logging

import pytest

from splitserve.cli import main
from splitserve.cluster.ray_init import pin_local_ray_auth, ray_init_args
from splitserve.config import ClusterSection, ConfigError
from splitserve.ops.logs import JsonFormatter, RequestIdFilter, request_id_var
from splitserve.ops.status_table import format_status
from splitserve.ops.submit import SubmitError, build_submission
from splitserve.server.metrics import RateWindow

CONFIG = "model: {path: tiny}\ncluster: {device: cpu}\nserver: {grpc_port: 6001, http_port: 6002}\n"


def _record(message: str) -> logging.LogRecord:
    record = logging.LogRecord("splitserve.x", logging.INFO, __file__, 1, message, (), None)
    RequestIdFilter().filter(record)
    return record


def test_json_log_lines_carry_the_request_id_of_the_request_being_served():
    outside = json.loads(JsonFormatter().format(_record("starting")))
    assert outside["message"] == "starting" and outside["level"] == "INFO" and "request_id" not in outside
    token = request_id_var.set("req-42")
    try:
        inside = json.loads(JsonFormatter().format(_record("worker died")))
    finally:
        request_id_var.reset(token)
    assert inside["request_id"] == "req-42"
    assert inside["ts"].endswith("Z")


def test_status_table_lists_pools_and_workers():
    status = {
        "model": "tiny",
        "mode": "disaggregated",
        "inflight": 3,
        "requests_per_s": 1.5,
        "tokens_per_s": 30.0,
        "rate_window_s": 60.0,
        "kv_blocks_total": "192",
        "kv_blocks_free": "144",
        "workers": [
            {"worker_id": "decode-0", "role": "decode", "healthy": True, "device": "cpu", "batch_size": 2,
             "kv_blocks_total": "128", "kv_blocks_free": "96", "active_requests": 2,
             "prefix_cache_lookup_blocks": "40", "prefix_cache_hit_blocks": "30"},
            {"worker_id": "prefill-1", "role": "prefill", "healthy": True, "draining": True, "device": "cuda:0",
             "kv_blocks_total": "64", "kv_blocks_free": "48", "restarts": 1},
        ],
        "router_loads": [{"worker_id": "decode-0", "requests": 2.0}],
    }  # fmt: skip
    table = format_status(status)
    assert "3 in flight, 1.50 req/s, 30.0 tokens/s" in table
    assert "KV blocks: 48/192 (25%)" in table
    lines = table.splitlines()
    prefill = next(line for line in lines if line.startswith("prefill-1")).split()
    assert prefill[:5] == ["prefill-1", "prefill", "draining", "1", "cuda:0"]
    assert prefill[-2:] == ["-", "0"]  # nothing looked up in its prefix cache yet
    decode = next(line for line in lines if line.startswith("decode-0")).split()
    assert decode[-5:] == ["2", "32/128", "(25%)", "75%", "2"]
    assert lines.index(next(line for line in lines if line.startswith("prefill-1"))) < lines.index(
        next(line for line in lines if line.startswith("decode-0"))
    )


def test_submission_runs_serve_on_the_config_inside_the_working_dir(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "my cluster.yaml").write_text(CONFIG)
    job = build_submission(str(tmp_path / "configs" / "my cluster.yaml"), str(tmp_path), drain_timeout_s=20)
    assert job.entrypoint == "python -m splitserve serve 'configs/my cluster.yaml' --drain-timeout 20"
    assert job.runtime_env["working_dir"] == str(tmp_path)
    assert int(job.runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) > 20  # Ray must not SIGKILL mid-drain
    assert job.metadata["splitserve_grpc"] == "127.0.0.1:6001"


def test_submission_errors_name_the_flag(tmp_path):
    outside = tmp_path / "c.yaml"
    outside.write_text(CONFIG)
    (tmp_path / "wd").mkdir()
    with pytest.raises(SubmitError, match="--working-dir"):
        build_submission(str(outside), str(tmp_path / "wd"), 30)
    outside.write_text("model: {path: tiny}\nprefill: {replicas: 0}\n")
    with pytest.raises(ConfigError, match=r"prefill\.replicas"):
        build_submission(str(outside), str(tmp_path), 30)


def test_a_ray_job_joins_its_cluster_and_a_bare_serve_starts_its_own():
    section = ClusterSection()
    assert ray_init_args(section, {"RAY_ADDRESS": "10.0.0.1:6379"})["address"] == "auto"
    local = ray_init_args(section, {})
    assert "address" not in local and local["include_dashboard"] is False
    configured = ray_init_args(ClusterSection(address="ray://head:10001"), {"RAY_ADDRESS": "x"})
    assert configured == {"address": "ray://head:10001", "namespace": "splitserve"}


def test_a_local_ray_keeps_token_auth_on_explicitly_and_a_joined_one_is_left_alone():
    local: dict[str, str] = {}
    pin_local_ray_auth(ClusterSection(), local)
    assert local == {"RAY_AUTH_MODE": "token"}  # explicit, so Ray does not warn that it chose it
    chosen = {"RAY_AUTH_MODE": "disabled"}
    pin_local_ray_auth(ClusterSection(), chosen)
    assert chosen == {"RAY_AUTH_MODE": "disabled"}
    joined: dict[str, str] = {"RAY_ADDRESS": "10.0.0.1:6379"}
    pin_local_ray_auth(ClusterSection(), joined)
    pin_local_ray_auth(ClusterSection(address="10.0.0.1:6379"), local_copy := {})
    assert joined == {"RAY_ADDRESS": "10.0.0.1:6379"} and local_copy == {}


def test_rates_cover_the_window_only():
    now = [0.0]
    rates = RateWindow(window_s=10.0, clock=lambda: now[0])
    now[0] = 5.0
    rates.record(20)
    rates.record(30)
    assert rates.rates() == (2 / 5.0, 50 / 5.0)  # younger than the window: over the time since start
    now[0] = 16.0
    rates.record(10)
    assert rates.rates() == (1 / 10.0, 10 / 10.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["scale", "prefill"], "REPLICAS must be"),
        (["scale", "decode", "2", "--rebalance"], "not both"),
        (["scale"], "not both"),
    ],
)
def test_scale_usage_errors(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
