"""A tensor-parallel worker on a real cluster (Ray actors, gloo on CPU, the tiny model): one worker of two ranks to
the router and in status, greedy output equal to HF, and a rank's death takes the whole group down and back up
with nothing stranded."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray.util.placement_group import placement_group_table

from splitserve.client.calls import status_dict
from splitserve.engine.testing import hf_greedy_reference
from splitserve.ops.status_table import WORKER_COLUMNS, format_status
from splitserve.server.cluster_metrics import ClusterCollector
from splitserve.server.grpc_service import cluster_status_message
from tests.chaos.harness import Harness, chaos_config, kill_mid_request, prompts, run_request, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MAX_NEW = 8
TP = 2


@pytest.fixture(scope="module")
def h(ray_local, tiny_model_dir):
    config = chaos_config(
        tiny_model_dir,
        mode="colocated",
        decode={"replicas": 1, "tensor_parallel_size": TP, "num_kv_blocks": 256},
        router={"max_retries": 2},
    )
    harness = Harness(config)
    try:
        yield harness
    finally:
        harness.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_one_worker_of_two_ranks_serves_hf_greedy_and_shows_as_one_worker(h, tiny_model_dir):
    ps = prompts(4, lo=3, hi=40, seed=37)

    async def scenario():
        outs = await asyncio.gather(*(run_request(h.cluster, f"tp-{i}", p, MAX_NEW) for i, p in enumerate(ps)))
        await h.audit()
        return outs

    outs = h.run(scenario())
    assert [o.tokens for o in outs] == hf_greedy_reference(tiny_model_dir, ps, MAX_NEW)
    worker = h.cluster.workers["decode-0"]
    (follower,) = worker.info["followers"]
    assert follower["rank"] == 1 and follower["pid"] != worker.info["pid"] and _alive(follower["pid"])


def test_status_and_metrics_show_the_group_as_one_worker_of_its_ranks(h):
    """Through the API's own path: worker status -> the ClusterStatus message -> the client's dict -> the table."""
    (status,) = h.cluster.worker_status()
    assert (status["worker_id"], status["tensor_parallel_size"], status["gpus"]) == ("decode-0", TP, 0.0)
    message = cluster_status_message(h.run(h.cluster.status()))
    answer = status_dict(message)
    table = format_status(answer).splitlines()
    header = table.index(next(line for line in table if line.startswith("WORKER")))
    (row,) = [line.split() for line in table[header + 1 :]]
    assert dict(zip(WORKER_COLUMNS[:7], row[:7], strict=True))["TP"] == str(TP)

    registry = CollectorRegistry()
    registry.register(ClusterCollector(h.cluster.worker_status))
    samples = {
        (sample.name, sample.labels["worker_id"]): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert {worker for _, worker in samples} == {"decode-0"}  # one worker, whatever its ranks
    assert samples["splitserve_worker_tensor_parallel_size", "decode-0"] == TP
    assert samples["splitserve_worker_gpus", "decode-0"] == 0.0  # on CPU
    assert samples["splitserve_worker_tp_step_handoff_seconds_total", "decode-0"] > 0  # the earlier test's steps


@pytest.mark.parametrize("victim", ["follower", "leader"])
def test_a_rank_killed_mid_request_restarts_the_whole_group(h, tiny_model_dir, victim):
    """SIGKILL one rank while requests decode: each request completes (retried on the restarted group, the same
    greedy tokens) or fails UNAVAILABLE; the other rank goes too, with the placement group; the fresh group serves
    and no page is left held."""
    ps = prompts(3, lo=20, hi=40, seed=41)
    want = hf_greedy_reference(tiny_model_dir, ps, 40)
    worker = h.cluster.workers["decode-0"]
    leader_pid, (follower,) = worker.info["pid"], worker.info["followers"]
    old_placement = worker.placement
    pid = follower["pid"] if victim == "follower" else leader_pid
    kill_mid_request(h, "decode-0", pid, ps, want, 40, f"kill-{victim}", timeout=300)
    assert not _alive(leader_pid) and not _alive(follower["pid"])
    assert placement_group_table(old_placement)["state"] == "REMOVED"
    fresh = h.cluster.workers["decode-0"]
    assert fresh.placement is not old_placement and len(fresh.info["followers"]) == TP - 1
    assert placement_group_table(fresh.placement)["state"] == "CREATED"


def test_a_follower_killed_while_idle_restarts_the_group_before_any_request_finds_it(h, tiny_model_dir):
    """No request needs to fail first: the leader sees its follower go and ends, and the health loop restarts the
    group; the next request is served by the fresh one."""
    worker = h.cluster.workers["decode-0"]
    leader_pid, (follower,) = worker.info["pid"], worker.info["followers"]

    async def scenario():
        os.kill(follower["pid"], signal.SIGKILL)
        await until(lambda: h.cluster.workers["decode-0"].restarts > worker.restarts, 60, "the group restarted")
        await h.audit(deadline_s=60)
        return await run_request(h.cluster, "after-idle", [5, 6, 7], MAX_NEW)

    served = h.run(scenario(), timeout=180)
    assert not _alive(leader_pid)
    assert served.status == "completed" and served.timing.retries == 0
    assert served.tokens == hf_greedy_reference(tiny_model_dir, [[5, 6, 7]], MAX_NEW)[0]


def test_a_pool_of_groups_scales_by_whole_groups(h):
    """Scaling adds a group with its own placement and drains one away with its follower and placement."""

    async def scenario():
        grown = await h.cluster.scale("decode", 2)
        workers = {w: h.cluster.workers[w] for w in ("decode-0", grown.added[0])}
        placements = {w: worker.placement for w, worker in workers.items()}
        statuses = {s["worker_id"]: s["tensor_parallel_size"] for s in h.cluster.worker_status()}
        (gone,) = (await h.cluster.scale("decode", 1)).removed
        await h.audit()
        pids = [workers[gone].info["pid"], workers[gone].info["followers"][0]["pid"]]
        await until(lambda: not any(map(_alive, pids)), 30, "the drained group's ranks exited")
        return placements, statuses, gone

    placements, statuses, gone = h.run(scenario(), timeout=180)
    assert statuses == dict.fromkeys(placements, TP)
    (kept,) = set(placements) - {gone}
    assert list(h.cluster.workers) == [kept]
    assert placement_group_table(placements[gone])["state"] == "REMOVED"
    assert placement_group_table(placements[kept])["state"] == "CREATED"
