"""The hand-off trace: silent unless switched on; on, a disaggregated request's events land in causal order across
the router, both workers and the transfer, and the report times them from the prefill's last layer."""

from __future__ import annotations

import asyncio

import pytest

from splitserve import handoff_trace
from splitserve.bench.handoff_report import load, main, timeline
from splitserve.cluster.controller import Cluster
from splitserve.cluster.messages import GenerateRequest
from splitserve.engine import SamplingParams
from tests.support import RAY_TEST_ENV, tiny_cluster_config

# Each pair must be in this order for every request: a cause before its effect (same host clock everywhere).
CAUSAL = [
    ("router.reserve", "decode.reserved"),
    ("decode.reserved", "router.reserved"),
    ("decode.reserved", "prefill.transfer_begin"),
    ("router.reserve", "prefill.queued"),
    ("prefill.queued", "prefill.pass_launched"),
    ("prefill.pass_launched", "prefill.transfer_begin"),
    ("prefill.pass_launched", "prefill.last_layer"),
    ("router.reserved", "decode.start"),
    ("prefill.transfer_begin", "receiver.begin"),
    ("receiver.begin", "receiver.claimed"),
    ("receiver.claimed", "receiver.end"),
    ("prefill.last_layer", "prefill.first_token"),
    ("prefill.first_token", "router.first_token"),
    ("router.first_token", "decode.start"),
    ("sender.end", "receiver.end"),
    ("receiver.end", "receiver.completed"),
    ("receiver.completed", "prefill.transfer_done"),
    ("receiver.completed", "decode.kv_ready"),
    ("decode.start", "decode.kv_ready"),
    ("decode.kv_ready", "decode.admitted"),
    ("decode.admitted", "router.second_token"),
]
# nccl's receives; grpc lands as it reads
OUT_OF_BAND_ONLY = {"receiver.pages_in", "receiver.land_issued", "receiver.landed"}


def test_nothing_is_written_while_off(tmp_path, monkeypatch):
    monkeypatch.setattr(handoff_trace._trace, "directory", None)
    handoff_trace.mark("router.reserve", "r1")
    monkeypatch.setattr(handoff_trace._trace, "directory", str(tmp_path / "on"))
    handoff_trace.mark("router.reserve", "r1")
    assert [p.name for p in tmp_path.iterdir()] == ["on"]


def test_the_report_times_each_event_from_the_last_layer_and_keeps_a_retry_first_attempt(tmp_path):
    (tmp_path / "101.log").write_text(
        "10.000 prefill.last_layer r1\n10.010 router.first_token r1\n20.000 prefill.last_layer r2\n"
        "20.030 router.first_token r2\n"
    )
    (tmp_path / "102.log").write_text("10.090 router.second_token r1\n10.050 router.second_token r1\n5.0 x r3\n")
    rows = {event: (n, p) for event, n, p in timeline(load(tmp_path))}
    assert list(rows) == ["prefill.last_layer", "router.first_token", "router.second_token"]
    assert rows["router.first_token"][0] == 2 and rows["router.first_token"][1]["p50"] == pytest.approx(20.0)
    assert rows["router.second_token"] == (
        1,
        {"p10": pytest.approx(50.0), "p50": pytest.approx(50.0), "p90": pytest.approx(50.0)},
    )


def test_the_report_counts_from_another_anchor_where_asked(tmp_path, capsys):
    (tmp_path / "1.log").write_text("5.000 router.reserve r1\n5.080 prefill.first_token r1\n9.0 prefill.queued r2\n")
    main([str(tmp_path), "--anchor", "router.reserve"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 requests; ms since router.reserve"
    first_token = next(line.split() for line in lines if line.startswith("prefill.first_token"))
    assert first_token[1] == "1" and float(first_token[3]) == pytest.approx(80.0)  # r2 has no anchor: not counted


@pytest.mark.slow
def test_a_disaggregated_request_leaves_every_event_in_causal_order(tmp_path, tiny_model_dir, monkeypatch):
    import ray

    trace = tmp_path / "trace"
    monkeypatch.setattr(handoff_trace._trace, "directory", str(trace))  # the router runs in this process
    env = {"env_vars": {**RAY_TEST_ENV["env_vars"], handoff_trace.ENV: str(trace)}}  # the workers, in theirs
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    try:
        asyncio.new_event_loop().run_until_complete(_two_requests(tiny_cluster_config(tiny_model_dir)))
    finally:
        ray.shutdown()
    events = load(trace)
    assert set(events) == {"a", "b"}
    for seen in events.values():
        assert set(handoff_trace.EVENTS) - OUT_OF_BAND_ONLY <= set(seen)
        late = [(a, b) for a, b in CAUSAL if seen[a] > seen[b]]
        assert not late, f"effects before their causes: {late}"


async def _two_requests(config) -> None:
    cluster = Cluster(config)
    await cluster.start()
    try:
        for rid, prompt in [("a", list(range(3, 40))), ("b", list(range(50, 61)))]:
            request = GenerateRequest(rid, prompt, SamplingParams(max_tokens=4, ignore_eos=True))
            tokens = [t async for batch in cluster.generate(request) for t in batch.tokens]
            assert len(tokens) == 4
    finally:
        await cluster.shutdown()
