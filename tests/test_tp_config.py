"""The tensor-parallel pool fields: whole GPUs per rank, GPUs counted per rank, one placement bundle per rank, and
what a worker learns of the other pool's ranks (the links its KV moves over)."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.cluster.rank_group import CPU_PER_RANK, rank_bundles
from splitserve.cluster.worker_options import options_for
from splitserve.config import ConfigError, Device, load_config, parse_config

SEVENTY_B = Path(__file__).parents[1] / "configs" / "llama3-70b-h200-1p2d.yaml"


def _error(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "c.yaml")
    return str(info.value)


@pytest.mark.parametrize("gpus", [0.5, 2, 0])
def test_a_gpu_share_other_than_one_per_rank_is_refused_naming_both_fields(gpus):
    message = _error({"cluster": {"device": "cuda"}, "decode": {"tensor_parallel_size": 2, "gpus_per_replica": gpus}})
    assert message.splitlines()[-1].startswith(f"decode.gpus_per_replica: {gpus:g} with decode.tensor_parallel_size: 2")
    assert "fix: remove decode.gpus_per_replica" in message


def test_on_cpu_the_gpu_share_is_ignored_and_a_pool_not_run_is_not_checked():
    cpu = parse_config({"cluster": {"device": "cpu"}, "decode": {"tensor_parallel_size": 4, "gpus_per_replica": 0}})
    assert cpu.decode.tensor_parallel_size == 4
    colocated = {"mode": "colocated", "cluster": {"device": "cuda"}}
    parse_config({**colocated, "prefill": {"tensor_parallel_size": 2, "gpus_per_replica": 0.5}})


def test_gpus_are_counted_per_rank():
    config = load_config(SEVENTY_B)
    assert (config.prefill.gpus_per_worker, config.decode.gpus_per_worker, config.gpus_needed) == (4, 2, 8)
    cluster = {"device": "cuda", "total_gpus": 8}
    message = _error({"cluster": cluster, "prefill": {"tensor_parallel_size": 4}, "decode": {"replicas": 5}})
    assert "the pools need 9 GPUs (prefill 1×4, decode 5×1, hybrid 0×1)" in message


def test_one_bundle_per_rank_of_whole_gpus_of_the_pools_type_or_a_cpu_share():
    config = load_config(SEVENTY_B)
    assert rank_bundles(config.prefill, Device.cuda) == [{"GPU": 1.0, "accelerator_type:H200": 0.001}] * 4
    assert rank_bundles(config.decode, Device.cpu) == [{"CPU": CPU_PER_RANK}] * 2
    assert options_for(config, config.prefill, "/m").tensor_parallel_size == 4


def test_every_worker_of_a_split_cluster_learns_the_prefill_pools_ranks_and_none_of_a_colocated_one():
    config = load_config(SEVENTY_B)
    assert [options_for(config, pool, "/m").prefill_tensor_parallel_size for pool in config.pools().values()] == [4] * 3
    colocated = parse_config({"mode": "colocated", "decode": {"tensor_parallel_size": 2}})
    assert options_for(colocated, colocated.decode, "/m").prefill_tensor_parallel_size is None
