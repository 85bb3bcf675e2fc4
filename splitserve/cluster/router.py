"""Assigns each request a prefill worker and a decode worker by the load of each phase's pool.

The router keeps its own account of the load it has placed (prompt tokens waiting per prefill worker, KV tokens
held per decode worker), updated as requests move on, so a decision costs no RPC and is deterministic under test.
Policies:
- ``round_robin``: the baseline, blind to load;
- ``jsq``: join the shortest queue, by pending prefill tokens for prompts and by KV occupancy for decoding
  (Splitwise's scheduler);
- ``borrow_idle``: jsq, and when every prefill worker is backed up while a decode worker is lightly loaded, that
  decode worker runs the prompt itself;
- ``cache_aware``: jsq less what each worker's prefix cache saves, as the prefix index (``prefix_index.py``, fed by
  the workers' cache events) sees it. A prefill worker's cost is its pending prompt tokens less the prompt's
  tokens it holds (``pending - cached``: the tokens it computes before this request's first token, but for the
  prompt's own uncached part, the same everywhere); a decode worker's is its KV occupancy less
  ``decode_prefix_weight`` x the cached tokens, over its capacity (``(held - weight * cached) / capacity``). So a
  conversation goes back to the worker holding its prefix unless that worker's load exceeds the others' by more than
  the prefix saves. A request's ``session_id`` is a hint: the worker that served the session last wins while its
  cost exceeds the best one's by at most ``session_slack_tokens``. Conditional disaggregation: a request whose
  decode worker holds its prefix, all but at most ``local_prefill_max_tokens`` of the prompt, runs there alone
  (the rest of its prompt computed on top of the cached context, no KV moved), and such a worker counts the whole
  prompt as saved in its cost, since none of its KV would move to it.

Workers of the ``hybrid`` pool (Splitwise's mixed pool) are decode workers that also take prompt overflow under any
policy: they decode like the others, and when every prefill worker is backed up (or none can take the request) the
least-loaded of them runs the whole request itself, before ``borrow_idle`` would turn to an idle decode worker.

A worker being removed (scale down, role switch) is marked draining: it keeps its running requests and gets no new
ones. The router also samples each phase's pressure, so ``rebalance_move`` can suggest moving one worker from the
lighter pool to the busier one once the imbalance has lasted a whole window.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splitserve.cluster.messages import ErrorCode, ServingError
from splitserve.cluster.prefix_index import PrefixIndex
from splitserve.config import RouterConfig, RouterPolicy
from splitserve.engine.block_manager import CacheEvents
from splitserve.roles import Role

# Prefill backlog (tokens per worker) that counts as backed up, and decode occupancy that counts as idle (the
# ``borrow_idle`` policy's threshold). The simulator imports both by these names.
PREFILL_BACKLOG_TOKENS = 8192
DECODE_IDLE_OCCUPANCY = 0.25
# Rebalance policy: samples (one per health check) an imbalance must last, and the pressure gap that counts.
REBALANCE_WINDOW = 10
REBALANCE_MARGIN = 0.5
# Sessions whose last workers the router remembers (``cache_aware``); the least recently placed is forgotten first.
MAX_SESSIONS = 65536


@dataclass
class _WorkerLoad:
    worker_id: str
    capacity_tokens: int = 0  # decode: KV capacity in tokens
    pending_tokens: int = 0  # prefill: prompt tokens assigned, not yet prefilled
    held_tokens: int = 0  # decode: KV tokens of requests assigned, not finished
    requests: int = 0
    max_queue: int = 1 << 30
    healthy: bool = True
    draining: bool = False
    hybrid: bool = False  # decode: a hybrid-pool worker, which also runs whole requests when prefill is backed up

    @property
    def occupancy(self) -> float:
        return self.held_tokens / self.capacity_tokens if self.capacity_tokens else 0.0


def _decode_key(w: _WorkerLoad) -> tuple[float, int]:
    return w.occupancy, w.requests


def _prefill_key(w: _WorkerLoad) -> tuple[float, int]:
    return w.pending_tokens, w.requests


@dataclass(frozen=True)
class _Cost:
    """``cache_aware``'s cost of a worker (lower is better), and what one token of session slack is worth in it."""

    of: Callable[[_WorkerLoad], float]
    per_token: Callable[[_WorkerLoad], float]


@dataclass
class Placement:
    """Where one attempt runs, and the load it booked there. ``prefill_done`` un-books the prompt once it has left
    the prefill queue; ``release`` un-books whatever is still booked. Both act once, so every way an attempt ends can
    call ``release`` and its load comes back exactly once. Equal when the workers are (the booking is not compared).
    """

    prefill_worker: str | None  # None: the decode worker prefills locally (hybrid pool, borrow_idle, a short
    # uncached suffix under cache_aware, colocated)
    decode_worker: str
    # What is still booked: the loads themselves, so a worker replaced under the same id is never un-booked for us.
    _prefill: _WorkerLoad | None = field(default=None, compare=False, repr=False)
    _decode: _WorkerLoad | None = field(default=None, compare=False, repr=False)
    _prompt_tokens: int = field(default=0, compare=False, repr=False)
    _held_tokens: int = field(default=0, compare=False, repr=False)

    def prefill_done(self) -> None:
        """The prompt left the prefill queue (its first token came): un-book it there."""
        if self._prefill is not None:
            self._prefill.pending_tokens -= self._prompt_tokens
            self._prefill.requests -= 1
            self._prefill = None

    def release(self) -> None:
        """The attempt is over, however it ended: un-book everything it still holds."""
        self.prefill_done()
        if self._decode is not None:
            self._decode.held_tokens -= self._held_tokens
            self._decode.requests -= 1
            self._decode = None


@dataclass(frozen=True)
class Move:
    """Move one worker from ``source`` (a role) to ``target``: start one there, then drain one here."""

    source: Role
    target: Role


@dataclass
class PhaseBalance:
    """Remembers the last ``window`` pressure gaps (prefill minus decode, each in [0, 1]).

    Prefill pressure is the mean backlog per prefill worker over PREFILL_BACKLOG_TOKENS (a backed-up
    worker), capped at 1; decode pressure is the mean KV occupancy. Only a gap that kept its sign and exceeded
    ``margin`` in every sample of a full window suggests a move, so a burst never flips a worker.
    """

    window: int = REBALANCE_WINDOW
    margin: float = REBALANCE_MARGIN
    gaps: deque[float] = field(default_factory=deque)

    def observe(self, prefill_pressure: float, decode_pressure: float) -> None:
        self.gaps.append(prefill_pressure - decode_pressure)
        while len(self.gaps) > self.window:
            self.gaps.popleft()

    def move(self, prefill_workers: int, decode_workers: int) -> Move | None:
        if len(self.gaps) < self.window:
            return None
        if all(g > self.margin for g in self.gaps) and decode_workers > 1:
            return Move(source=Role.DECODE, target=Role.PREFILL)
        if all(g < -self.margin for g in self.gaps) and prefill_workers > 1:
            return Move(source=Role.PREFILL, target=Role.DECODE)
        return None


@dataclass
class Router:
    policy: RouterPolicy
    decode_prefix_weight: float = RouterConfig.model_fields["decode_prefix_weight"].default
    session_slack_tokens: int = RouterConfig.model_fields["session_slack_tokens"].default
    local_prefill_max_tokens: int = RouterConfig.model_fields["local_prefill_max_tokens"].default
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    _sessions: OrderedDict[str, tuple[str | None, str]] = field(default_factory=OrderedDict)
    _prefill: dict[str, _WorkerLoad] = field(default_factory=dict)
    _decode: dict[str, _WorkerLoad] = field(default_factory=dict)
    _rr_prefill: itertools.count = field(default_factory=itertools.count)
    _rr_decode: itertools.count = field(default_factory=itertools.count)
    _rr_hybrid: itertools.count = field(default_factory=itertools.count)
    balance: PhaseBalance = field(default_factory=PhaseBalance)

    @classmethod
    def from_config(cls, config: RouterConfig) -> Router:
        return cls(
            config.policy, config.decode_prefix_weight, config.session_slack_tokens, config.local_prefill_max_tokens
        )

    # --- membership ---

    def add_prefill_worker(self, worker_id: str, max_queue: int, block_size: int | None = None) -> None:
        """``block_size``: the worker's KV block size, which its cache events hash by (None: not indexed)."""
        self._prefill[worker_id] = _WorkerLoad(worker_id, max_queue=max_queue)
        self._index(worker_id, block_size)

    def add_decode_worker(
        self, worker_id: str, capacity_tokens: int, max_queue: int, hybrid: bool = False, block_size: int | None = None
    ) -> None:
        self._decode[worker_id] = _WorkerLoad(
            worker_id, capacity_tokens=capacity_tokens, max_queue=max_queue, hybrid=hybrid
        )
        self._index(worker_id, block_size)

    def _index(self, worker_id: str, block_size: int | None) -> None:
        self.prefix_index.remove_worker(worker_id)  # a worker replaced under the same id starts with an empty cache
        if block_size is not None:
            self.prefix_index.add_worker(worker_id, block_size)

    def remove_worker(self, worker_id: str) -> None:
        self._prefill.pop(worker_id, None)
        self._decode.pop(worker_id, None)
        self.prefix_index.remove_worker(worker_id)

    def cache_events(self, worker_id: str, events: CacheEvents) -> None:
        """A worker's prefix cache changed (its channel's ``CacheEvents``)."""
        self.prefix_index.apply(worker_id, events)

    def set_healthy(self, worker_id: str, healthy: bool) -> None:
        for pool in (self._prefill, self._decode):
            if worker_id in pool:
                pool[worker_id].healthy = healthy

    def set_draining(self, worker_id: str) -> None:
        """Send the worker no new requests; the ones it has keep running."""
        for pool in (self._prefill, self._decode):
            if worker_id in pool:
                pool[worker_id].draining = True

    @property
    def prefill_workers(self) -> list[str]:
        return list(self._prefill)

    @property
    def decode_workers(self) -> list[str]:
        return list(self._decode)

    # --- decisions ---

    def _choose(
        self,
        pool: dict[str, _WorkerLoad],
        key,
        rr: itertools.count,
        exclude: set[str],
        cost: _Cost | None = None,
        favored: str | None = None,
    ) -> _WorkerLoad:
        """The pool's pick: by ``cost`` (``cache_aware``, with the session's ``favored`` worker) where given."""
        usable = [w for w in pool.values() if w.healthy and not w.draining and w.worker_id not in exclude]
        if not usable:
            raise ServingError(ErrorCode.UNAVAILABLE, "no healthy worker in the pool; retry later")
        candidates = [w for w in usable if w.requests < w.max_queue]
        if not candidates:
            raise ServingError(ErrorCode.RESOURCE_EXHAUSTED, "every worker's queue is full; retry later")
        if self.policy == RouterPolicy.round_robin:
            return candidates[next(rr) % len(candidates)]
        if cost is None:
            return min(candidates, key=key)
        best = min(candidates, key=lambda w: (cost.of(w), w.requests))
        session = next((w for w in candidates if w.worker_id == favored), None)
        if session is not None and cost.of(session) - self.session_slack_tokens * cost.per_token(session) <= cost.of(
            best
        ):
            return session
        return best

    def place(
        self,
        prompt_tokens: int,
        max_tokens: int,
        exclude: frozenset[str] = frozenset(),
        *,
        prompt: Sequence[int] | None = None,
        session_id: str | None = None,
    ) -> Placement:
        """Pick the workers for a request and book its load on them, until the placement is released. ``prompt``
        (its token ids) and ``session_id`` count under ``cache_aware`` only."""
        excluded = set(exclude)
        cache_aware = self.policy == RouterPolicy.cache_aware and prompt is not None
        cached: dict[str, int] = {}
        last_prefill = last_decode = None
        if cache_aware:
            assert prompt is not None
            cached = self.prefix_index.cached_tokens(prompt, [*self._prefill, *self._decode])
            if session_id is not None and session_id in self._sessions:
                last_prefill, last_decode = self._sessions[session_id]
        local_max = self.local_prefill_max_tokens if self._prefill else 0

        def runs_alone(w: _WorkerLoad) -> bool:
            """``w`` holds the prompt's prefix, all but at most ``local_max`` tokens: it runs the request alone."""
            held = cached.get(w.worker_id, 0)
            return held > 0 and prompt_tokens - held <= local_max

        def not_moved(w: _WorkerLoad) -> int:
            """The prompt's KV tokens that need not move to decode worker ``w``."""
            return prompt_tokens if runs_alone(w) else cached[w.worker_id]

        prefill_cost = _Cost(lambda w: w.pending_tokens - cached[w.worker_id], lambda w: 1.0)
        decode_cost = _Cost(
            lambda w: (w.held_tokens - self.decode_prefix_weight * not_moved(w)) / max(w.capacity_tokens, 1),
            lambda w: 1.0 / max(w.capacity_tokens, 1),
        )
        decode = self._choose(
            self._decode, _decode_key, self._rr_decode, excluded, decode_cost if cache_aware else None, last_decode
        )
        prefill: _WorkerLoad | None = None
        if self._prefill and not runs_alone(decode):
            refused: ServingError | None = None
            try:
                prefill = self._choose(
                    self._prefill,
                    _prefill_key,
                    self._rr_prefill,
                    excluded,
                    prefill_cost if cache_aware else None,
                    last_prefill,
                )
            except ServingError as err:
                refused = err
            if prefill is None or prefill.pending_tokens >= PREFILL_BACKLOG_TOKENS:
                local = self._overflow(decode, excluded)
                if local is not None:
                    prefill, decode = None, local
                elif refused is not None:
                    raise refused
        # What the prompt adds to its prefill worker's queue: the tokens it computes there.
        computed = prompt_tokens - (cached.get(prefill.worker_id, 0) if prefill is not None else 0)
        if prefill is not None:
            prefill.pending_tokens += computed
            prefill.requests += 1
        decode.held_tokens += prompt_tokens + max_tokens
        decode.requests += 1
        if cache_aware and session_id is not None:
            # A run without a prefill worker leaves the session's last one holding its longest prompt there.
            self._remember(session_id, prefill.worker_id if prefill else last_prefill, decode.worker_id)
        return Placement(
            prefill.worker_id if prefill else None,
            decode.worker_id,
            prefill,
            decode,
            computed,
            prompt_tokens + max_tokens,
        )

    def _remember(self, session_id: str, prefill: str | None, decode: str) -> None:
        self._sessions[session_id] = (prefill, decode)
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)

    def _overflow(self, decode: _WorkerLoad, excluded: set[str]) -> _WorkerLoad | None:
        """Who runs a whole request while prefill is backed up: a hybrid-pool worker, else (``borrow_idle``) the
        chosen decode worker if it is nearly idle, else nobody (the request waits in a prefill queue)."""
        hybrid = {k: w for k, w in self._decode.items() if w.hybrid}
        if hybrid:
            try:
                return self._choose(hybrid, _decode_key, self._rr_hybrid, excluded)
            except ServingError:
                pass  # every hybrid worker is full or down
        if self.policy == RouterPolicy.borrow_idle and decode.occupancy <= DECODE_IDLE_OCCUPANCY:
            return decode
        return None

    # --- phase balance ---

    def phase_pressure(self) -> tuple[float, float]:
        """(prefill, decode) pressure in [0, 1], over the workers taking requests (see PhaseBalance)."""
        prefill = [w for w in self._prefill.values() if not w.draining]
        decode = [w for w in self._decode.values() if not w.draining]
        backlog = sum(w.pending_tokens for w in prefill) / max(len(prefill), 1) / PREFILL_BACKLOG_TOKENS
        occupancy = sum(w.occupancy for w in decode) / max(len(decode), 1)
        return min(backlog, 1.0), min(occupancy, 1.0)

    def sample_balance(self) -> None:
        self.balance.observe(*self.phase_pressure())

    def rebalance_move(self) -> Move | None:
        """The move the sampled imbalance calls for, if any (a disaggregated cluster only)."""
        if not self._prefill:
            return None
        active = [sum(not w.draining for w in pool.values()) for pool in (self._prefill, self._decode)]
        return self.balance.move(*active)

    def loads(self) -> dict[str, dict[str, float]]:
        return {
            w.worker_id: {
                "pending_tokens": w.pending_tokens,
                "held_tokens": w.held_tokens,
                "occupancy": w.occupancy,
                "requests": w.requests,
                "healthy": float(w.healthy),
                "draining": float(w.draining),
            }
            for w in [*self._prefill.values(), *self._decode.values()]
        }
