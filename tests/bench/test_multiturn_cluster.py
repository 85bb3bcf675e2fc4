"""The multi-turn benchmark against a real tiny cluster (Ray actors on CPU, KV moved between processes over gRPC)."""

from __future__ import annotations

import asyncio
import json

import pytest

from splitserve.bench.local_cluster import local_cluster
from splitserve.bench.multiturn import MultiTurnSpec, ThinkDist, build_conversations
from splitserve.bench.multiturn_load import OK, max_context, replay_at
from splitserve.bench.multiturn_report import PolicyRun, report_dict
from splitserve.cli import main as cli_main
from splitserve.client import AsyncClient
from splitserve.config import ServingMode
from splitserve.simulator.workload import LengthDist
from tests.support import tiny_cluster_config

pytestmark = pytest.mark.slow


def test_turn_two_resends_turn_one_and_its_answer(ray_local, tiny_model_dir, tmp_path):
    trace = tmp_path / "conv.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,12,2\n1,20,3\n2,16,2\n")
    spec = MultiTurnSpec(
        trace=str(trace), conversations=2, turns=LengthDist("fixed", 2), think=ThinkDist("fixed", (0.0,)), seed=3
    )
    config = tiny_cluster_config(tiny_model_dir)

    async def scenario():
        async with local_cluster(config, ServingMode.disaggregated) as address:
            conversations = build_conversations(spec, await max_context(address))
            replay = await replay_at(address, conversations, timeout_s=60)
            async with AsyncClient(address) as client:  # turn 1 again: greedy, so the same answer
                repeats = [
                    await client.generate(
                        prompt_token_ids=replay.prompts[(c.index, 0)],
                        max_tokens=c.turns[0].max_tokens,
                        ignore_eos=True,
                        temperature=0.0,
                        stream=False,
                    )
                    for c in conversations
                ]
            argv = ["bench", "--address", address, "--multiturn", "--trace", str(trace), "--conversations", "2"]
            argv += ["--turns", "2", "--think", "0", "--label", "tiny", "--out-dir", str(tmp_path), "--timeout", "60"]
            code = await asyncio.to_thread(cli_main, argv)
        return conversations, replay, repeats, code

    conversations, replay, repeats, code = asyncio.new_event_loop().run_until_complete(scenario())

    assert len(replay.records) == 4 and all(r.status == OK for r in replay.records)
    for c, repeat in zip(conversations, repeats, strict=True):
        first, second = replay.prompts[(c.index, 0)], replay.prompts[(c.index, 1)]
        answer = second[len(first) : len(first) + c.turns[0].max_tokens]
        assert second[: len(first)] == first
        assert answer == repeat.token_ids
        assert second[len(first) + len(answer) :] == c.turns[1].message_ids
        record = next(r for r in replay.records if (r.conversation, r.turn) == (c.index, 1))
        assert (record.reused_tokens, record.new_tokens) == (len(first) + len(answer), len(c.turns[1].message_ids))

    report = report_dict({}, [PolicyRun("jsq", replay.duration_s, replay.records)])
    (run,) = report["policies"]
    assert [s["turn"] for s in run["per_turn"]] == [0, 1]
    for s in run["per_turn"]:
        assert s["requests"] == s["ok"] == 2
        assert s["ttft_ms"]["p50"] > 0 and s["ttft_ms"]["p90"] >= s["ttft_ms"]["p50"]
        assert s["kv_transfer_ms"]["p50"] > 0  # disaggregated: every turn's KV moved
    assert run["per_turn"][1]["same_prefill_worker"] == 1.0  # one prefill worker: every turn goes back to it
    # It held the first prompts' full blocks, so the second turns computed less than their prompts.
    assert run["per_turn"][0]["hit_rate"] == 0 and run["per_turn"][1]["hit_rate"] > 0
    assert run["per_turn"][1]["computed_tokens"] < run["per_turn"][1]["prompt_tokens"]
    assert all(s["kv_bytes"] > 0 for s in run["per_turn"])

    assert code == 0
    written = json.loads((tmp_path / "tiny-multiturn.json").read_text())
    assert [s["ok"] for s in written["policies"][0]["per_turn"]] == [2, 2]
    assert written["meta"]["workload"]["conversations"] == 2
