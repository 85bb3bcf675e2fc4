"""The YAML cluster config: one pydantic model per section, strict about unknown keys and impossible values.

Every error a user can make in the YAML is reported as ``path.to.field: what is wrong (fix: ...)`` so that a
broken file is fixed from the message alone.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TINY_MODEL = "tiny"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names each bad field and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Dtype(StrEnum):
    auto = "auto"  # bfloat16 on GPU, float32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(StrEnum):
    auto = "auto"  # cuda when the workers see a GPU, else cpu
    cpu = "cpu"
    cuda = "cuda"


class ModelConfig(_Section):
    path: str = Field(
        TINY_MODEL,
        description="HF checkpoint directory (config.json + safetensors + tokenizer), or 'tiny' for the built-in "
        "random-weight test model.",
    )
    name: str | None = Field(None, description="Model name served by the APIs; defaults to the directory name.")
    dtype: Dtype = Field(Dtype.auto, description="Weights and KV cache dtype.")
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + output in tokens; defaults to the checkpoint's context length."
    )

    @property
    def served_name(self) -> str:
        return self.name or Path(self.path.rstrip("/")).name


class ClusterSection(_Section):
    address: str | None = Field(
        None, description="Ray cluster address ('auto' to join a running cluster); none starts a local Ray."
    )
    device: Device = Field(Device.auto, description="Where workers run their engines.")
    total_gpus: int | None = Field(
        None, ge=0, description="GPUs the cluster has, checked against the pools at load time; none = not checked."
    )
    namespace: str = Field("splitserve", description="Ray namespace of the actors.")


class _PoolConfig(_Section):
    replicas: int = Field(1, ge=1, description="Number of workers in this pool.")
    gpus_per_replica: float = Field(
        1.0,
        ge=0,
        description="GPUs per worker at tensor_parallel_size 1 (fractions share a GPU: start NVIDIA's MPS daemon, "
        '"nvidia-cuda-mps-control -d", first, so that their kernels run side by side rather than in time slices; '
        "docs/multiturn.md); ignored on CPU.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="Ranks of each worker's tensor-parallel group: on CUDA it holds this many whole GPUs of one node, "
        "on CPU it runs this many gloo ranks. One worker to the router and in status, whatever its size.",
    )
    gpu_type: str | None = Field(
        None, description="Ray accelerator type the pool is placed on (e.g. H100, H200); none = any node."
    )
    max_queue: int = Field(256, ge=1, description="Requests a worker queues before the router stops sending to it.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV blocks per worker; none = sized from gpu_memory_fraction (GPU) or 2048 (CPU)."
    )
    gpu_memory_fraction: float = Field(
        0.85, gt=0, le=0.95, description="Share of its GPU a worker may fill with weights, activations and KV cache."
    )
    prompt_graph_tokens: int = Field(
        1024,
        ge=0,
        description="On GPU, whole prompts up to this many tokens replay a CUDA graph captured at start (a short "
        "prompt's eager pass is bound by the host's kernel launches); 0 runs every prompt eager, saving the graphs' "
        "memory and start time.",
    )

    @property
    def gpus_per_worker(self) -> float:
        """GPUs one worker holds: one per rank of a tensor-parallel group, else ``gpus_per_replica``."""
        return self.gpus_per_replica * self.tensor_parallel_size

    def check_gpus(self, name: str, device: Device) -> None:
        """A tensor-parallel worker holds whole GPUs, one per rank: a fraction (or none) cannot be split over ranks."""
        tp = self.tensor_parallel_size
        if tp > 1 and device != Device.cpu and self.gpus_per_replica != 1:
            raise ValueError(
                f"{name}.gpus_per_replica: {self.gpus_per_replica:g} with {name}.tensor_parallel_size: {tp}; a "
                f"tensor-parallel worker holds one whole GPU per rank (fix: remove {name}.gpus_per_replica, which "
                f"then counts 1 GPU per rank, or set {name}.tensor_parallel_size: 1 to share a GPU)"
            )


class PrefillPoolConfig(_PoolConfig):
    max_batch_tokens: int = Field(
        8192,
        ge=16,
        description="Token budget of one prefill batch (prompts are packed). A prompt that arrives during a pass "
        "waits for its end: a smaller budget shortens that wait under bursts, at some prefill throughput (~10% of "
        "goodput at 2048 tokens for an 8B model on an H100, docs/benchmarks.md, Chaos and abort).",
    )


class DecodePoolConfig(_PoolConfig):
    max_batch_size: int = Field(128, ge=1, description="Sequences decoded together in one step.")
    overlap_decode: bool = Field(
        True,
        description="On GPU, launch each step before the previous one's tokens are read back, so the host's work per "
        "step hides behind the device's (one token is computed past a stop and thrown away).",
    )


class HybridPoolConfig(DecodePoolConfig):
    replicas: int = Field(
        0,
        ge=0,
        description="Decode workers that also run whole requests (prompt and decode, chunked) whenever every prefill "
        "worker is backed up or full, under any router policy (Splitwise's mixed pool).",
    )
    max_batch_tokens: int = Field(8192, ge=16, description="Token budget of one prefill chunk.")


class KVBackend(StrEnum):
    auto = "auto"
    nccl = "nccl"
    cuda_ipc = "cuda_ipc"
    grpc = "grpc"
    tcp = "tcp"
    local = "local"


class KVTransferConfig(_Section):
    backend: KVBackend = Field(KVBackend.auto, description="How KV pages move from prefill to decode workers.")
    chunk_bytes: int = Field(4 << 20, ge=4096, description="Largest message of the grpc backend.")
    compression: Literal["none", "int8", "fp8"] = Field(
        "none", description="On-the-wire KV compression of the grpc and tcp backends (per-block scales)."
    )
    checksum: bool = Field(False, description="Verify a checksum of every transfer on the receiving side.")
    timeout_s: float = Field(30.0, gt=0, description="Last resort for a peer that stops answering mid-transfer.")


class RouterPolicy(StrEnum):
    round_robin = "round_robin"
    jsq = "jsq"  # join the shortest queue: pending prefill tokens / decode KV occupancy
    borrow_idle = "borrow_idle"  # jsq, plus idle workers of one pool serve the other phase under overload
    cache_aware = "cache_aware"  # jsq less the prompt's prefix each worker's cache holds (the router's prefix index)


# Values renamed: the old name is refused with the new one, so a config never silently changes meaning.
_RENAMED_POLICIES = {"mixed": RouterPolicy.borrow_idle}


class RouterConfig(_Section):
    policy: RouterPolicy = Field(RouterPolicy.jsq, description="How requests are assigned to workers.")

    @field_validator("policy", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, str) and value in _RENAMED_POLICIES:
            new = _RENAMED_POLICIES[value].value
            raise ValueError(f"the policy {value!r} is now called {new!r} (fix: policy: {new})")
        return value

    max_queue: int = Field(1024, ge=1, description="Requests admitted and not finished; more get RESOURCE_EXHAUSTED.")
    max_retries: int = Field(2, ge=0, description="Times a request is re-run after its worker died.")
    decode_prefix_weight: float = Field(
        10.0,
        ge=0,
        description="cache_aware: a prompt token a decode worker holds in its prefix cache (every prompt token, "
        "where it would run the request alone) counts as this many tokens of its KV load. The default sends a "
        "conversation back to its decode worker until that worker holds 10x the prompt's tokens of KV more than the "
        "least loaded one: a small share of a worker's KV, and what moving the context would cost is the whole "
        "prompt's KV or its recompute (docs/multiturn.md).",
    )
    session_slack_tokens: int = Field(
        256,
        ge=0,
        description="cache_aware: a request's session goes back to the worker that served it last while that "
        "worker's cost exceeds the best one's by at most this many tokens.",
    )
    local_prefill_max_tokens: int = Field(
        512,
        ge=0,
        description="cache_aware: a request whose decode worker holds its prefix, all but at most this many prompt "
        "tokens, runs there alone: the rest of the prompt is computed in that worker's batch on top of its cached "
        "context and no KV moves. The default is about one prompt chunk that keeps a step near a decode step's "
        "time, so the worker's running requests lose little, and covers a typical follow-up turn (the previous "
        "answer and a new message). 0: every request with a prefill pool is split (docs/multiturn.md).",
    )


class TLSConfig(_Section):
    cert_file: str = Field(..., description="PEM certificate chain.")
    key_file: str = Field(..., description="PEM private key.")


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Address both APIs listen on.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC API port (0 = any free port).")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI-compatible HTTP port (0 = any free port).")
    auth_token: str | None = Field(
        None, description="Bearer token both APIs require; the env var SPLITSERVE_AUTH_TOKEN overrides it."
    )
    tls: TLSConfig | None = Field(None, description="Serve TLS on both APIs.")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="Largest request accepted.")
    max_concurrent_per_client: int = Field(64, ge=1, description="Requests in flight per client (token or peer).")

    @property
    def effective_auth_token(self) -> str | None:
        return os.environ.get("SPLITSERVE_AUTH_TOKEN") or self.auth_token


class SLOConfig(_Section):
    ttft_ms: float = Field(1000.0, gt=0, description="Time to first token target.")
    tpot_ms: float = Field(50.0, gt=0, description="Time per output token target.")


class KVCacheConfig(_Section):
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV page.")
    prefix_caching: bool = Field(True, description="Reuse full KV blocks of repeated prompt prefixes.")


class ServingMode(StrEnum):
    disaggregated = "disaggregated"
    colocated = "colocated"  # one pool does both phases with chunked prefill (the baseline)


class SplitserveConfig(_Section):
    mode: ServingMode = Field(ServingMode.disaggregated, description="Split pools, or the colocated baseline.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    prefill: PrefillPoolConfig = Field(default_factory=PrefillPoolConfig)
    decode: DecodePoolConfig = Field(default_factory=DecodePoolConfig)
    hybrid: HybridPoolConfig = Field(default_factory=HybridPoolConfig)
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    slo: SLOConfig = Field(default_factory=SLOConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed_sections(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mixed" in data:
            raise ValueError("mixed: the pool is now called hybrid (fix: rename the key 'mixed:' to 'hybrid:')")
        return data

    def pools(self) -> dict[str, _PoolConfig]:
        """The pools this mode runs, by YAML key (colocated mode runs no prefill pool)."""
        pools: dict[str, _PoolConfig] = {"prefill": self.prefill} if self.mode == ServingMode.disaggregated else {}
        return {**pools, "decode": self.decode, "hybrid": self.hybrid}

    @model_validator(mode="after")
    def _whole_gpus_per_rank(self) -> SplitserveConfig:
        for name, pool in self.pools().items():
            pool.check_gpus(name, self.cluster.device)
        return self

    @model_validator(mode="after")
    def _fits_the_cluster(self) -> SplitserveConfig:
        gpus = self.cluster.total_gpus
        if gpus is None or self.cluster.device == Device.cpu:
            return self
        needed = self.gpus_needed
        if needed > gpus:
            pools = ", ".join(f"{name} {p.replicas}×{p.gpus_per_worker:g}" for name, p in self.pools().items())
            raise ValueError(
                f"cluster.total_gpus: the pools need {needed:g} GPUs ({pools}) but cluster.total_gpus is {gpus}"
                " (fix: lower the replicas, gpus_per_replica or tensor_parallel_size, or raise cluster.total_gpus)"
            )
        return self

    @property
    def gpus_needed(self) -> float:
        return sum(p.replicas * p.gpus_per_worker for p in self.pools().values())


_FIX_HINTS: dict[str, str] = {
    "extra_forbidden": "remove it, or check its spelling against the valid keys: {valid}",
    "missing": "add this key",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a smaller value",
    "less_than": "use a smaller value",
    "enum": "use one of the listed values",
    "literal_error": "use one of the listed values",
}


def _valid_keys(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = SplitserveConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            break
        model = nested
    return ", ".join(model.model_fields)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``path: message (fix: ...)``."""
    lines = []
    for e in err.errors():
        message = e["msg"].removeprefix("Value error, ")
        hint = _FIX_HINTS.get(e["type"])
        if hint and "(fix:" not in message:
            message += f" (fix: {hint.format(valid=_valid_keys(e['loc']))})"
        # Cross-field checks name their own path in the message.
        lines.append(f"{'.'.join(str(p) for p in e['loc'])}: {message}" if e["loc"] else message)
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, source: str = "<config>") -> SplitserveConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (fix: start with 'model:' etc.)")
    try:
        return SplitserveConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid config\n{format_validation_error(err)}") from None


def load_config(path: str | Path) -> SplitserveConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    return parse_config(data, str(path))


def dump_config(config: SplitserveConfig) -> str:
    """The resolved config with every default filled in, as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
