"""Test support shared by the suites that start a real cluster: one way to write a tiny CPU cluster config."""

from __future__ import annotations

import socket
from typing import Any

from splitserve.config import SplitserveConfig, parse_config

RAY_TEST_ENV = {"env_vars": {"SPLITSERVE_CPU_THREADS": "1"}}


def tiny_cluster_config(model_dir, **overrides: Any) -> SplitserveConfig:
    """1 prefill + 1 decode CPU worker on the tiny model, KV over gRPC. A dict override is merged into its section
    (``prefill={"replicas": 2}`` keeps the other prefill keys); anything else replaces the value."""
    data: dict[str, Any] = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "cluster": {"device": "cpu"},
        "kv_cache": {"block_size": 8},
        "prefill": {"replicas": 1, "gpus_per_replica": 0, "num_kv_blocks": 256, "max_batch_tokens": 256},
        "decode": {"replicas": 1, "gpus_per_replica": 0, "num_kv_blocks": 512, "max_batch_size": 16},
        "kv_transfer": {"backend": "grpc", "timeout_s": 20},
        "server": {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


def nobody_listens(address: str) -> bool:
    """True when a connection to ``host:port`` is refused. (A bind probe would also fail on the server's closed
    connections lingering in TIME_WAIT, which says nothing about whether the server still listens.)"""
    with socket.socket() as probe:
        probe.settimeout(2)
        host, port = address.rsplit(":", 1)
        return probe.connect_ex((host, int(port))) != 0
