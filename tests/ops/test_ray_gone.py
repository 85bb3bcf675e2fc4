"""`splitserve serve` on a Ray cluster that then goes away (every Ray process of the head stopped under it): the
server closes its ports and exits with EXIT_RAY_GONE within its documented bound, for a supervisor to restart it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.launcher import EXIT_RAY_GONE, RAY_GONE_EXIT_BOUND_S
from tests.ops.ray_head import RayHead, wait_for
from tests.support import nobody_listens

pytestmark = pytest.mark.slow
LISTENING = re.compile(r"splitserve listening: grpc=(\S+) http=http://(\S+)")
SERVE_S = 150
# The 2-core test machine runs timers late; the bound is asserted with this much room.
SLACK_S = 30


def test_the_server_exits_when_its_ray_cluster_is_gone(ray_head: RayHead, tiny_model_dir, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"model: {{path: {tiny_model_dir}, dtype: float32}}\n"
        f"cluster: {{device: cpu, address: '{ray_head.gcs_address}'}}\n"
        "kv_cache: {block_size: 8}\n"
        "prefill: {replicas: 1, gpus_per_replica: 0, num_kv_blocks: 64}\n"
        "decode: {replicas: 1, gpus_per_replica: 0, num_kv_blocks: 64}\n"
        "kv_transfer: {backend: grpc}\n"
        "server: {host: 127.0.0.1, grpc_port: 0, http_port: 0}\n"
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "splitserve", "serve", str(config)],
            env=ray_head.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        found = wait_for(
            lambda: server.poll() is None and LISTENING.search(log_path.read_text()),
            "the server to listen",
            SERVE_S,
            log_path.read_text,
        )
        ray_head.stop()
        try:
            code = server.wait(RAY_GONE_EXIT_BOUND_S + SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {RAY_GONE_EXIT_BOUND_S + SLACK_S:.0f} s after Ray stopped\n{_tail(log_path)}")
        logged = log_path.read_text()
        assert code == EXIT_RAY_GONE, logged
        assert "the Ray cluster is gone" in logged
        assert nobody_listens(found.group(1)) and nobody_listens(found.group(2))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _tail(path: Path) -> str:
    return "\n".join(path.read_text().splitlines()[-40:])
