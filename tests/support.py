"""Test support shared by several suites: one way to write a tiny CPU cluster config, and one way to serve
requests through an engine as they arrive."""

from __future__ import annotations

import socket
from typing import Any

from splitserve.config import SplitserveConfig, parse_config
from splitserve.engine import Engine, SamplingParams
from splitserve.engine.overlap import PENDING_TOKEN

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


def serve_arriving(engine: Engine, requests: list[tuple[list[int], SamplingParams]], arrive_every: int = 0):
    """Serve ``requests`` (one arriving every ``arrive_every`` steps, or all at once); outputs per request."""
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    texts: dict[str, str] = {}
    queue = list(enumerate(requests))
    steps = 0
    while queue or engine.has_work():
        while queue and (arrive_every == 0 or steps % arrive_every == 0):
            i, (prompt, params) = queue.pop(0)
            engine.add_request(f"r{i}", prompt, params)
            tokens[f"r{i}"], texts[f"r{i}"] = [], ""
            if arrive_every:
                break
        for out in engine.step():
            assert out.token_id != PENDING_TOKEN
            tokens[out.request_id].append(out.token_id)
            texts[out.request_id] += out.text
            if out.finished:
                finished[out.request_id] = out.finish_reason
        steps += 1
    return tokens, finished, texts
