"""The paged-KV model runner shared by prefill and decode workers."""

from splitserve.engine.block_manager import BlockManager, OutOfBlocks
from splitserve.engine.engine import Engine, EngineConfig, GenerationResult, RequestError, TokenOutput
from splitserve.engine.runner import ModelRunner, RunnerConfig
from splitserve.engine.sampling_params import SamplingParams

__all__ = [
    "BlockManager",
    "Engine",
    "EngineConfig",
    "GenerationResult",
    "ModelRunner",
    "OutOfBlocks",
    "RequestError",
    "RunnerConfig",
    "SamplingParams",
    "TokenOutput",
]
