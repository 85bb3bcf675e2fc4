"""What each pool's workers are built with, from the cluster config."""

from __future__ import annotations

from pathlib import Path

from splitserve.cluster.worker_options import options_for
from splitserve.config import load_config


def test_only_pools_that_decode_capture_decode_graphs_and_every_pool_graphs_its_prompts():
    config = load_config(Path(__file__).parents[2] / "configs" / "llama3-8b-1p1d.yaml")
    prefill = options_for(config, config.prefill, "/model").engine_config()
    decode = options_for(config, config.decode, "/model").engine_config()
    assert prefill.runner.use_cuda_graphs and not prefill.runner.decode_graphs
    assert prefill.runner.prompt_graph_tokens > 0
    assert decode.runner.use_cuda_graphs and decode.runner.decode_graphs
    assert decode.max_batch_size == config.decode.max_batch_size
