"""Assigns each request a prefill worker and a decode worker by the load of each phase's pool.

The router keeps its own account of the load it has placed (prompt tokens waiting per prefill worker, KV tokens
held per decode worker), updated as requests move on, so a decision costs no RPC and is deterministic under test.
Policies:
- ``round_robin``: the baseline, blind to load;
- ``jsq``: join the shortest queue, by pending prefill tokens for prompts and by KV occupancy for decoding
  (Splitwise's scheduler);
- ``mixed``: jsq, and when every prefill worker is backed up while a decode worker is lightly loaded, that decode
  worker runs the prompt itself (Splitwise's mixed pool).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from splitserve.cluster.messages import ErrorCode, ServingError
from splitserve.config import RouterPolicy

# Mixed policy thresholds: prefill backlog that counts as overloaded, and decode occupancy that counts as idle.
MIXED_PREFILL_BACKLOG_TOKENS = 8192
MIXED_DECODE_IDLE_OCCUPANCY = 0.25


@dataclass
class _WorkerLoad:
    worker_id: str
    capacity_tokens: int = 0  # decode: KV capacity in tokens
    pending_tokens: int = 0  # prefill: prompt tokens assigned, not yet prefilled
    held_tokens: int = 0  # decode: KV tokens of requests assigned, not finished
    requests: int = 0
    max_queue: int = 1 << 30
    healthy: bool = True

    @property
    def occupancy(self) -> float:
        return self.held_tokens / self.capacity_tokens if self.capacity_tokens else 0.0


@dataclass(frozen=True)
class Placement:
    prefill_worker: str | None  # None: the decode worker prefills locally (mixed pool / colocated)
    decode_worker: str


@dataclass
class Router:
    policy: RouterPolicy
    _prefill: dict[str, _WorkerLoad] = field(default_factory=dict)
    _decode: dict[str, _WorkerLoad] = field(default_factory=dict)
    _rr_prefill: itertools.count = field(default_factory=itertools.count)
    _rr_decode: itertools.count = field(default_factory=itertools.count)

    # --- membership ---

    def add_prefill_worker(self, worker_id: str, max_queue: int) -> None:
        self._prefill[worker_id] = _WorkerLoad(worker_id, max_queue=max_queue)

    def add_decode_worker(self, worker_id: str, capacity_tokens: int, max_queue: int) -> None:
        self._decode[worker_id] = _WorkerLoad(worker_id, capacity_tokens=capacity_tokens, max_queue=max_queue)

    def remove_worker(self, worker_id: str) -> None:
        self._prefill.pop(worker_id, None)
        self._decode.pop(worker_id, None)

    def set_healthy(self, worker_id: str, healthy: bool) -> None:
        for pool in (self._prefill, self._decode):
            if worker_id in pool:
                pool[worker_id].healthy = healthy

    @property
    def prefill_workers(self) -> list[str]:
        return list(self._prefill)

    @property
    def decode_workers(self) -> list[str]:
        return list(self._decode)

    # --- decisions ---

    def _choose(self, pool: dict[str, _WorkerLoad], key, rr: itertools.count, exclude: set[str]) -> _WorkerLoad:
        usable = [w for w in pool.values() if w.healthy and w.worker_id not in exclude]
        if not usable:
            raise ServingError(ErrorCode.UNAVAILABLE, "no healthy worker in the pool; retry later")
        candidates = [w for w in usable if w.requests < w.max_queue]
        if not candidates:
            raise ServingError(ErrorCode.RESOURCE_EXHAUSTED, "every worker's queue is full; retry later")
        if self.policy == RouterPolicy.round_robin:
            return candidates[next(rr) % len(candidates)]
        return min(candidates, key=key)

    def place(self, prompt_tokens: int, max_tokens: int, exclude: frozenset[str] = frozenset()) -> Placement:
        """Pick the workers for a request and book its load on them."""
        excluded = set(exclude)
        decode = self._choose(self._decode, lambda w: (w.occupancy, w.requests), self._rr_decode, excluded)
        prefill: _WorkerLoad | None = None
        if self._prefill:
            try:
                prefill = self._choose(
                    self._prefill, lambda w: (w.pending_tokens, w.requests), self._rr_prefill, excluded
                )
            except ServingError:
                if self.policy != RouterPolicy.mixed:
                    raise
        if (
            self.policy == RouterPolicy.mixed
            and (prefill is None or prefill.pending_tokens >= MIXED_PREFILL_BACKLOG_TOKENS)
            and decode.occupancy <= MIXED_DECODE_IDLE_OCCUPANCY
        ):
            prefill = None
        elif prefill is None and self._prefill:
            raise ServingError(ErrorCode.UNAVAILABLE, "no prefill worker can take the request; retry later")
        if prefill is not None:
            prefill.pending_tokens += prompt_tokens
            prefill.requests += 1
        decode.held_tokens += prompt_tokens + max_tokens
        decode.requests += 1
        return Placement(prefill.worker_id if prefill else None, decode.worker_id)

    # --- bookkeeping as requests move on ---

    def prefill_done(self, worker_id: str, prompt_tokens: int) -> None:
        load = self._prefill.get(worker_id)
        if load is not None:
            load.pending_tokens = max(0, load.pending_tokens - prompt_tokens)
            load.requests = max(0, load.requests - 1)

    def decode_done(self, worker_id: str, booked_tokens: int) -> None:
        load = self._decode.get(worker_id)
        if load is not None:
            load.held_tokens = max(0, load.held_tokens - booked_tokens)
            load.requests = max(0, load.requests - 1)

    def loads(self) -> dict[str, dict[str, float]]:
        return {
            w.worker_id: {
                "pending_tokens": w.pending_tokens,
                "held_tokens": w.held_tokens,
                "occupancy": w.occupancy,
                "requests": w.requests,
                "healthy": float(w.healthy),
            }
            for w in [*self._prefill.values(), *self._decode.values()]
        }
