"""What is simulated: the pools, their batching limits, the router policy and the SLOs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from splitserve.simulator.errors import SimInputError
from splitserve.simulator.profile import Profile

Mode = Literal["disaggregated", "colocated"]
Policy = Literal["round_robin", "jsq", "mixed"]  # as the runtime's router.policy


@dataclass(frozen=True)
class PoolSpec:
    """A pool of identical one-GPU replicas of one GPU type (cost and power come from its profile)."""

    replicas: int
    profile: Profile
    max_batch_tokens: int = 8192  # prefill: prompt tokens per batch; colocated: tokens per step (Sarathi budget)
    max_batch_requests: int = 1 << 30  # prefill: prompts per batch (1 turns a prefill worker into an M/G/1 server)
    max_batch_size: int = 256  # decode: running sequences per step
    # Each step launched before the previous one is read back (the runtime's ``overlap_decode``): a step with a
    # prompt chunk, host-bound to launch, then holds back the tokens of the step before it until it ends.
    overlap_decode: bool = True


@dataclass(frozen=True)
class ClusterSpec:
    """``colocated`` uses only ``prefill`` as the one mixed pool (chunked prefill); ``decode`` is ignored there.
    ``mixed`` (disaggregated only) is the runtime's mixed pool: decode workers that also run whole requests while
    every prefill worker is backed up (what a colocated replica does all the time, hence the same pool name).
    ``shared_gpus`` (disaggregated, equal pools, no mixed pool): prefill replica i and decode replica i share one GPU
    (fractional ``gpus_per_replica``), counted once; a decode step slows while its GPU runs a prefill pass
    (``serving.shared_gpu_slowdown``), and a prefill pass that starts while the decode worker steps slows too
    (``serving.shared_gpu_prefill_slowdown``)."""

    mode: Mode
    prefill: PoolSpec
    decode: PoolSpec | None = None
    policy: Policy = "jsq"
    kv_backend: str = "nccl"
    mixed: PoolSpec | None = None
    shared_gpus: bool = False

    def __post_init__(self) -> None:
        pools = [self.prefill] if self.mode == "colocated" else [self.prefill, self.decode]
        if any(p is None for p in pools):
            raise SimInputError("--decode: disaggregated mode needs a decode pool (fix: pass --decode N)")
        for name, pool in zip(("prefill", "decode"), pools, strict=False):
            if pool.replicas < 1:  # type: ignore[union-attr]
                raise SimInputError(f"--{name}: needs >= 1 replica, got {pool.replicas}")  # type: ignore[union-attr]
        if self.mixed is not None and (self.mode == "colocated" or self.mixed.replicas < 1):
            raise SimInputError("--mixed: a mixed pool needs disaggregated mode and >= 1 replica (fix: drop --mixed)")
        if self.mode == "disaggregated" and self.kv_backend not in self.prefill.profile.kv_transfer:
            known = ", ".join(self.prefill.profile.kv_transfer)
            raise SimInputError(f"--kv-backend: {self.kv_backend!r} is not in the profile (fix: one of {known})")
        if self.shared_gpus and (
            self.mode != "disaggregated" or self.mixed is not None or self.prefill.replicas != self.decode.replicas  # type: ignore[union-attr]
        ):
            raise SimInputError(
                "--shared-gpus: pairs one prefill and one decode replica per GPU (fix: disaggregated, as many decode "
                "as prefill replicas, no --mixed)"
            )

    @property
    def pools(self) -> dict[str, PoolSpec]:
        if self.mode == "colocated":
            return {"mixed": self.prefill}
        assert self.decode is not None  # __post_init__
        pools = {"prefill": self.prefill, "decode": self.decode}
        return pools if self.mixed is None else {**pools, "mixed": self.mixed}

    @property
    def gpus(self) -> int:
        return self.prefill.replicas if self.shared_gpus else sum(p.replicas for p in self.pools.values())

    @property
    def cost_per_hour(self) -> float:
        if self.shared_gpus:  # one GPU per pair, of the prefill pool's type (one GPU has one type)
            return self.prefill.replicas * self.prefill.profile.gpu.cost_per_hour
        return sum(p.replicas * p.profile.gpu.cost_per_hour for p in self.pools.values())

    def with_replicas(self, prefill: int, decode: int | None = None) -> ClusterSpec:
        dec = replace(self.decode, replicas=decode) if self.decode and decode is not None else self.decode
        return replace(self, prefill=replace(self.prefill, replicas=prefill), decode=dec)
