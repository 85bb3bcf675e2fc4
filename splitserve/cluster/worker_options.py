"""What a worker actor needs to build its engine, derived from the cluster config for one pool."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.config import (
    KVTransferConfig,
    PrefillPoolConfig,
    RouterPolicy,
    ServingMode,
    SplitserveConfig,
    _PoolConfig,
)
from splitserve.engine.engine import EngineConfig
from splitserve.engine.runner import RunnerConfig


@dataclass(frozen=True)
class WorkerOptions:
    model_dir: str
    device: str
    dtype: str
    block_size: int
    num_kv_blocks: int | None
    gpu_memory_fraction: float
    max_batch_tokens: int
    max_batch_size: int
    prefix_caching: bool
    max_model_len: int | None
    kv_transfer: KVTransferConfig
    max_queue: int
    decode_graphs: bool  # a prefill-only worker never runs a decode step: its decode graphs would only cost start time
    overlap_decode: bool  # on where the device runs ahead of the host (CUDA)
    prompt_graph_tokens: int
    tensor_parallel_size: int = 1  # ranks of the worker's group: this actor leads, the others follow (rank_group)
    # The prefill pool's, where KV moves between pools (mode: disaggregated): a decode worker's links come from its
    # ranks (head_map.py). None: no KV moves (colocated).
    prefill_tensor_parallel_size: int | None = None
    # The router places by the workers' prefix caches (cache_aware): each step's cache changes go to it.
    cache_events: bool = False

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            RunnerConfig(
                model_dir=self.model_dir,
                device=self.device,
                dtype=self.dtype,
                block_size=self.block_size,
                num_kv_blocks=self.num_kv_blocks,
                gpu_memory_fraction=self.gpu_memory_fraction,
                max_batch_tokens=self.max_batch_tokens,
                max_model_len=self.max_model_len,
                decode_graphs=self.decode_graphs,
                prompt_graph_tokens=self.prompt_graph_tokens,
            ),
            max_batch_size=self.max_batch_size,
            enable_prefix_caching=self.prefix_caching,
            overlap_decode=None if self.overlap_decode else False,
        )


def options_for(config: SplitserveConfig, pool: _PoolConfig, model_dir: str) -> WorkerOptions:
    return WorkerOptions(
        model_dir=model_dir,
        device=config.cluster.device.value,
        dtype=config.model.dtype.value,
        block_size=config.kv_cache.block_size,
        num_kv_blocks=pool.num_kv_blocks,
        gpu_memory_fraction=pool.gpu_memory_fraction,
        max_batch_tokens=getattr(pool, "max_batch_tokens", config.prefill.max_batch_tokens),
        max_batch_size=getattr(pool, "max_batch_size", config.decode.max_batch_size),
        prefix_caching=config.kv_cache.prefix_caching,
        max_model_len=config.model.max_model_len,
        kv_transfer=config.kv_transfer,
        max_queue=pool.max_queue,
        decode_graphs=not isinstance(pool, PrefillPoolConfig),
        overlap_decode=getattr(pool, "overlap_decode", config.decode.overlap_decode),
        prompt_graph_tokens=pool.prompt_graph_tokens,
        tensor_parallel_size=pool.tensor_parallel_size,
        prefill_tensor_parallel_size=(
            config.prefill.tensor_parallel_size if config.mode == ServingMode.disaggregated else None
        ),
        cache_events=config.router.policy == RouterPolicy.cache_aware,
    )
