"""The load generator against a real tiny cluster (Ray actors on CPU, KV moved between processes over gRPC)."""

from __future__ import annotations

import asyncio
import json

import pytest

from splitserve.bench import report
from splitserve.bench.loadgen import run_load
from splitserve.bench.local_cluster import local_cluster
from splitserve.bench.metrics import summarize
from splitserve.bench.requests import BenchRequest, WorkloadSpec
from splitserve.bench.sweep import run_sweep
from splitserve.client import AsyncClient
from splitserve.config import ServingMode
from splitserve.simulator.workload import LengthDist
from splitserve.slo import SLO
from tests.support import tiny_cluster_config

pytestmark = pytest.mark.slow
SPEC = WorkloadSpec(num_requests=8, prompt=LengthDist("uniform", 4, 40), output=LengthDist("uniform", 1, 8), seed=1)


def test_sweep_and_errors_add_up_on_a_real_cluster(ray_local, tiny_model_dir, tmp_path):
    config = tiny_cluster_config(tiny_model_dir, prefill={"num_kv_blocks": 128}, decode={"num_kv_blocks": 128})
    bad = BenchRequest(99, 0.0, [10**6], 4)  # a token id outside the vocabulary: INVALID_ARGUMENT

    async def scenario():
        async with local_cluster(config, ServingMode.disaggregated) as address:
            sweep = await run_sweep(address, SPEC, [20.0], SLO(), "disaggregated", warmup=1, timeout_s=60)
            async with AsyncClient(address, retries=0) as client:
                good = [BenchRequest(i, 0.0, [1, 2, 3], 3) for i in range(2)]
                mixed, duration = await run_load(client, [*good, bad], timeout_s=60)
        return sweep, mixed, duration

    sweep, mixed, duration = asyncio.new_event_loop().run_until_complete(scenario())

    (run,) = sweep.runs
    s, records = run.summary, run.records
    assert s.sent == SPEC.num_requests == len(records)
    assert s.ok + sum(s.errors.values()) == s.sent
    assert s.ok == s.sent  # an idle tiny cluster serves all of them
    assert s.output_tokens == sum(r.max_tokens for r in records if r.status == "ok")
    assert all(r.output_tokens == r.max_tokens for r in records)  # ignore_eos: exactly max_tokens each
    assert all(r.ttft_ms is not None and r.e2e_ms is not None and r.ttft_ms <= r.e2e_ms for r in records)
    # Disaggregated: the KV moved for every request that decodes; one token is all prefill, nothing to move.
    assert all((r.kv_transfer_ms or 0.0) > 0 for r in records if r.max_tokens > 1)
    assert all(0 <= (r.kv_exposed_ms or 0.0) < (r.kv_transfer_ms or 0.0) for r in records if r.max_tokens > 1)
    assert any(r.max_tokens > 1 for r in records)
    assert all((r.tpot_ms is None) == (r.max_tokens == 1) for r in records)
    gaps = [r.second_token_ms for r in records]
    assert all((g is None) == (r.max_tokens == 1) for g, r in zip(gaps, records, strict=True))
    assert all(g is None or 0 <= g <= r.e2e_ms for g, r in zip(gaps, records, strict=True))
    assert s.second_token_ms["p50"] is not None

    assert [r.status for r in mixed] == ["ok", "ok", "invalid_argument"]
    counted = summarize(mixed, duration, SLO(), "mixed", None)
    assert (counted.sent, counted.ok, counted.errors, counted.output_tokens) == (3, 2, {"invalid_argument": 1}, 6)

    report.write_json(tmp_path / "serve.json", {"test": True}, [sweep], None)
    report.plot(tmp_path / "serve.png", [sweep], None)
    saved = json.loads((tmp_path / "serve.json").read_text())
    assert saved["systems"][0]["runs"][0]["summary"]["sent"] == SPEC.num_requests
    assert (tmp_path / "serve.png").stat().st_size > 0
