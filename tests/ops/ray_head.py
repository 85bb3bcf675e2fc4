"""A Ray head of the test's own, started as a user would (`ray start --head` on loopback), and the waits around it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
START_S = 60
STOP_S = 60


def free_ports(count: int) -> list[int]:
    """Distinct free ports: every socket stays bound until all are picked, so the kernel cannot hand one out twice
    (Ray refuses two components on one port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_for(condition, what: str, timeout: float, details=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")
        time.sleep(0.5)


@dataclass
class RayHead:
    dashboard: str  # the job server's URL
    gcs_address: str  # what a driver's cluster.address names
    env: dict[str, str]  # the environment it runs with (token auth off, no RAY_ADDRESS)
    process: subprocess.Popen

    def stop(self) -> None:
        """`ray start --block` owns every Ray process it started and stops them all when terminated: this ends only
        what the fixture started."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_ray_head() -> Iterator[RayHead]:
    """Own ports and temp dir, so a Ray already running here (another test run) cannot clash."""
    from ray.job_submission import JobSubmissionClient

    gcs, dashboard_port, agent_http, agent_grpc, metrics, runtime_env, client_server = free_ports(7)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    temp_dir = tempfile.mkdtemp(prefix="ssray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "SPLITSERVE_CPU_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed in teardown)
    process = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--dashboard-port={dashboard_port}",
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
    head = RayHead(dashboard, f"127.0.0.1:{gcs}", env, process)

    def job_server_up() -> bool:
        assert process.poll() is None, f"ray start exited: {(Path(temp_dir) / 'ray-start.log').read_text()}"
        try:
            JobSubmissionClient(dashboard).list_jobs()
        except Exception:
            return False
        return True

    try:
        wait_for(job_server_up, "the Ray job server", START_S)
        yield head
    finally:
        head.stop()
        log.close()
