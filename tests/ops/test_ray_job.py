"""The main job as a Ray job, end to end: `ray start --head` on loopback, `splitserve submit`, a request through the
SDK, `ray job stop`; then the job is STOPPED after a clean drain, its actors are gone and its ports are free."""

from __future__ import annotations

import re
import subprocess

import pytest

from splitserve.cli import main
from splitserve.client import Client
from tests.ops.ray_head import BIN, STOP_S, RayHead
from tests.ops.ray_head import wait_for as _wait_for
from tests.support import nobody_listens

pytestmark = pytest.mark.slow
LISTENING = re.compile(r"splitserve listening: grpc=(\S+) http=http://(\S+)")
SERVE_S = 150


def test_submit_serve_request_stop(ray_head: RayHead, tiny_model_dir, tmp_path, capsys, monkeypatch):
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
    argv = ["submit", str(tmp_path / "cluster.yaml"), "--address", ray_head.dashboard, "--working-dir", str(tmp_path)]
    assert main([*argv, "--drain-timeout", "10"]) == 0
    printed = capsys.readouterr().out
    submitted = re.search(r"submitted splitserve job (\S+)", printed)
    assert submitted, printed
    job_id = submitted.group(1)
    assert f"ray job stop --address {ray_head.dashboard} {job_id}" in printed

    jobs = JobSubmissionClient(ray_head.dashboard)

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

    subprocess.run(
        [str(BIN / "ray"), "job", "stop", "--address", ray_head.dashboard, job_id], check=True, timeout=STOP_S
    )
    _wait_for(lambda: jobs.get_job_status(job_id) == JobStatus.STOPPED, "the job to be STOPPED", STOP_S)
    logs = jobs.get_job_logs(job_id)
    assert "every worker stopped" in logs and "splitserve: stopped" in logs, logs  # the drain ran, no SIGKILL

    def workers_gone() -> bool:
        alive = list_actors(
            address=ray_head.dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
        )
        return not [a for a in alive if a.class_name in ("PrefillWorker", "DecodeWorker")]

    _wait_for(workers_gone, "the worker actors to be gone", STOP_S)
    assert nobody_listens(grpc_address) and nobody_listens(http_address)
