"""The main job as a Ray job, end to end: `ray start --head` on loopback, `splitserve submit`, a request through the
SDK, `ray job stop`; then the job is STOPPED after a clean drain, its actors are gone and its ports are free."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitserve.cli import main
from splitserve.client import Client
from tests.support import nobody_listens

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
LISTENING = re.compile(r"splitserve listening: grpc=(\S+) http=http://(\S+)")
START_S = 60
SERVE_S = 150
STOP_S = 60


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: every socket stays bound until all are picked, so the kernel cannot hand one out twice
    (one-at-a-time picks collided in CI: Ray refuses two components on one port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _wait_for(condition, what: str, timeout: float, details=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")
        time.sleep(0.5)


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A Ray head of our own (own ports and temp dir) with its dashboard on 127.0.0.1; yields the dashboard URL.

    `ray start --block` owns every Ray process it starts and stops them all when terminated, so teardown ends
    only what this fixture started.
    """
    from ray.job_submission import JobSubmissionClient

    gcs, dashboard_port, agent_http, agent_grpc, metrics, runtime_env, client_server = _free_ports(7)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    temp_dir = tempfile.mkdtemp(prefix="ssray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "SPLITSERVE_CPU_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed in teardown)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--dashboard-port={dashboard_port}",
            # Every fixed default port too, so a Ray already running here (another test run) cannot clash.
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--ray-client-server-port={client_server}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def job_server_up() -> bool:
        assert head.poll() is None, f"ray start exited: {(Path(temp_dir) / 'ray-start.log').read_text()}"
        try:
            JobSubmissionClient(dashboard).list_jobs()
        except Exception:
            return False
        return True

    try:
        _wait_for(job_server_up, "the Ray job server", START_S)
        yield dashboard
    finally:
        head.terminate()
        try:
            head.wait(STOP_S)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()


def test_submit_serve_request_stop(ray_head, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    (tmp_path / "cluster.yaml").write_text(
        f"model: {{path: {tiny_model_dir}, dtype: float32}}\n"
        "cluster: {device: cpu}\n"
        "kv_cache: {block_size: 8}\n"
        "prefill: {replicas: 1, gpus_per_replica: 0, num_kv_blocks: 128}\n"
        "decode: {replicas: 1, gpus_per_replica: 0, num_kv_blocks: 128}\n"
        "kv_transfer: {backend: grpc}\n"
        "server: {host: 127.0.0.1, grpc_port: 0, http_port: 0}\n"
    )
    argv = ["submit", str(tmp_path / "cluster.yaml"), "--address", ray_head, "--working-dir", str(tmp_path)]
    assert main([*argv, "--drain-timeout", "10"]) == 0
    printed = capsys.readouterr().out
    submitted = re.search(r"submitted splitserve job (\S+)", printed)
    assert submitted, printed
    job_id = submitted.group(1)
    assert f"ray job stop --address {ray_head} {job_id}" in printed

    jobs = JobSubmissionClient(ray_head)

    def listening() -> re.Match[str] | None:
        status = jobs.get_job_status(job_id)
        assert status not in (JobStatus.FAILED, JobStatus.STOPPED), jobs.get_job_logs(job_id)
        return LISTENING.search(jobs.get_job_logs(job_id))

    found = _wait_for(listening, "the job to log its listening line", SERVE_S, lambda: jobs.get_job_logs(job_id))
    grpc_address, http_address = found.group(1), found.group(2)
    assert "prefill-0 ready (1/1 prefill)" in jobs.get_job_logs(job_id)

    with Client(grpc_address, timeout=60) as client:
        result = client.generate("Hello from a Ray job", max_tokens=8, ignore_eos=True, stream=False)
    assert len(result.token_ids) == 8 and result.finish_reason == "length"

    subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_head, job_id], check=True, timeout=STOP_S)
    _wait_for(lambda: jobs.get_job_status(job_id) == JobStatus.STOPPED, "the job to be STOPPED", STOP_S)
    logs = jobs.get_job_logs(job_id)
    assert "every worker stopped" in logs and "splitserve: stopped" in logs, logs  # the drain ran, no SIGKILL

    def workers_gone() -> bool:
        alive = list_actors(address=ray_head, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        return not [a for a in alive if a.class_name in ("PrefillWorker", "DecodeWorker")]

    _wait_for(workers_gone, "the worker actors to be gone", STOP_S)
    assert nobody_listens(grpc_address) and nobody_listens(http_address)
