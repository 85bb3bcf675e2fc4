"""What is simulated: the pools, their batching limits, the router policy and the SLOs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from splitserve.config import RouterConfig
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.profile import Profile

Mode = Literal["disaggregated", "colocated"]
# As the runtime's router.policy (``cache_aware``: prefix-aware placement, see ``Router``).
Policy = Literal["round_robin", "jsq", "borrow_idle", "cache_aware"]
POLICIES: tuple[Policy, ...] = ("jsq", "round_robin", "borrow_idle", "cache_aware")
RENAMED_POLICIES = {"mixed": "borrow_idle"}  # old name -> new name: an old name is an error naming the new one


def check_policy(value: str, field: str) -> Policy:
    """``value`` as a policy, or a ``SimInputError`` naming ``field`` (and the new name, for an old one)."""
    if value in RENAMED_POLICIES:
        new = RENAMED_POLICIES[value]
        raise SimInputError(f"{field}: the policy {value!r} is now called {new!r} (fix: {field} {new})")
    if value not in POLICIES:
        raise SimInputError(f"{field}: unknown policy {value!r} (fix: one of {', '.join(POLICIES)})")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class PoolSpec:
    """A pool of identical replicas of one GPU type, each a worker of ``profile.tensor_parallel_size`` GPUs (cost
    and power per GPU come from its profile)."""

    replicas: int
    profile: Profile
    max_batch_tokens: int = 8192  # prefill: prompt tokens per batch; colocated: tokens per step (Sarathi budget)
    max_batch_requests: int = 1 << 30  # prefill: prompts per batch (1 turns a prefill worker into an M/G/1 server)
    max_batch_size: int = 256  # decode: running sequences per step
    # Each step launched before the previous one is read back (the runtime's ``overlap_decode``): a step with a
    # prompt chunk, host-bound to launch, then holds back the tokens of the step before it until it ends.
    overlap_decode: bool = True

    @property
    def tp(self) -> int:
        return self.profile.tensor_parallel_size

    @property
    def gpus(self) -> int:
        return self.replicas * self.tp


@dataclass(frozen=True)
class ClusterSpec:
    """``colocated`` uses only ``prefill`` as its one pool (chunked prefill), named ``colocated`` in ``pools``;
    ``decode`` is ignored there. ``hybrid`` (disaggregated only) is the runtime's hybrid pool: decode workers that
    also run whole requests while every prefill worker is backed up (what a colocated replica does all the time).
    ``shared_gpus`` (disaggregated, equal pools, no hybrid pool): prefill replica i and decode replica i share one GPU
    (fractional ``gpus_per_replica``), counted once; a decode step slows while its GPU runs a prefill pass
    (``serving.shared_gpu_slowdown``), and a prefill pass that starts while the decode worker steps slows too
    (``serving.shared_gpu_prefill_slowdown``). ``incremental_transfer`` (conversation workloads): a decode worker that
    holds a conversation's KV receives only the rest of the prompt's (as the runtime does); off, every transfer moves
    the whole prompt's KV (the runtime with ``kv_cache.prefix_caching: false``). ``decode_prefix_weight``
    (``cache_aware``): a decode worker's held prefix counts as this many tokens of load per token (``Router``).
    ``local_prefill_max_tokens`` (``cache_aware``, with incremental transfer): a request whose decode worker holds
    all but at most this many of its prompt tokens is prefilled there, chunked into its steps, and moves no KV (the
    runtime's ``router.local_prefill_max_tokens``; 0: every request is split)."""

    mode: Mode
    prefill: PoolSpec
    decode: PoolSpec | None = None
    policy: Policy = "jsq"
    kv_backend: str = "nccl"
    hybrid: PoolSpec | None = None
    shared_gpus: bool = False
    incremental_transfer: bool = True
    decode_prefix_weight: float = RouterConfig.model_fields["decode_prefix_weight"].default
    local_prefill_max_tokens: int = RouterConfig.model_fields["local_prefill_max_tokens"].default

    def __post_init__(self) -> None:
        check_policy(self.policy, "--router")
        if not self.decode_prefix_weight >= 0:
            raise SimInputError(f"--decode-prefix-weight: must be >= 0, got {self.decode_prefix_weight}")
        if self.local_prefill_max_tokens < 0:
            raise SimInputError(f"--local-prefill-max-tokens: must be >= 0, got {self.local_prefill_max_tokens}")
        pools = [self.prefill] if self.mode == "colocated" else [self.prefill, self.decode]
        if any(p is None for p in pools):
            raise SimInputError("--decode: disaggregated mode needs a decode pool (fix: pass --decode N)")
        for name, pool in zip(("prefill", "decode"), pools, strict=False):
            if pool.replicas < 1:  # type: ignore[union-attr]
                raise SimInputError(f"--{name}: needs >= 1 replica, got {pool.replicas}")  # type: ignore[union-attr]
        if self.hybrid is not None and (self.mode == "colocated" or self.hybrid.replicas < 1):
            raise SimInputError(
                "--hybrid: a hybrid pool needs disaggregated mode and >= 1 replica (fix: drop --hybrid)"
            )
        if self.mode == "disaggregated" and self.kv_backend not in self.prefill.profile.kv_transfer:
            known = ", ".join(self.prefill.profile.kv_transfer)
            raise SimInputError(f"--kv-backend: {self.kv_backend!r} is not in the profile (fix: one of {known})")
        if self.shared_gpus and (
            self.mode != "disaggregated"
            or self.hybrid is not None
            or self.prefill.replicas != self.decode.replicas  # type: ignore[union-attr]
            or self.prefill.tp != 1
            or self.decode.tp != 1  # type: ignore[union-attr]
        ):
            raise SimInputError(
                "--shared-gpus: pairs one prefill and one decode replica per GPU (fix: disaggregated, as many decode "
                "as prefill replicas, no --hybrid, tensor_parallel_size 1 profiles)"
            )

    @property
    def pools(self) -> dict[str, PoolSpec]:
        if self.mode == "colocated":
            return {"colocated": self.prefill}
        assert self.decode is not None  # __post_init__
        pools = {"prefill": self.prefill, "decode": self.decode}
        return pools if self.hybrid is None else {**pools, "hybrid": self.hybrid}

    @property
    def gpus(self) -> int:
        return self.prefill.replicas if self.shared_gpus else sum(p.gpus for p in self.pools.values())

    @property
    def cost_per_hour(self) -> float:
        if self.shared_gpus:  # one GPU per pair, of the prefill pool's type (one GPU has one type)
            return self.prefill.replicas * self.prefill.profile.gpu.cost_per_hour
        return sum(p.gpus * p.profile.gpu.cost_per_hour for p in self.pools.values())

    def with_replicas(self, prefill: int, decode: int | None = None) -> ClusterSpec:
        dec = replace(self.decode, replicas=decode) if self.decode and decode is not None else self.decode
        return replace(self, prefill=replace(self.prefill, replicas=prefill), decode=dec)
