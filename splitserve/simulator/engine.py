"""The discrete-event simulation: one heap of timed events, the runtime's scheduling replayed on a profile.

Events are per batch, not per token: a prefill batch end, a KV transfer end, a decode (or mixed) step end.
A decode worker runs its steps inline, without the heap, until its next step would end after the earliest
pending event or arrival, the only things that could change its batch.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from splitserve.simulator.batch import DecodeBatch
from splitserve.simulator.cluster import ClusterSpec, PoolSpec
from splitserve.simulator.router import Router
from splitserve.simulator.workload import Workload

PREFILL_DONE, KV_ARRIVED, STEP_DONE = 0, 1, 2


@dataclass(frozen=True)
class RunResult:
    """Raw per-request times (seconds from the first arrival) and per-pool busy GPU-seconds."""

    cluster: ClusterSpec
    workload: Workload
    first_token_s: np.ndarray
    finish_s: np.ndarray
    busy_s: dict[str, float]
    events: int


class _Sim:
    """Shared state and the event loop; subclasses implement one serving mode."""

    def __init__(self, cluster: ClusterSpec, wl: Workload) -> None:
        self.cluster = cluster
        self.wl = wl
        n = len(wl)
        self.arrival = [*wl.arrival_s.tolist(), math.inf]  # sentinel: "no more arrivals"
        self.prompt = wl.prompt_tokens.tolist()
        self.out = wl.output_tokens.tolist()
        self.need = (wl.prompt_tokens + wl.output_tokens).tolist()
        self.first = [math.nan] * n
        self.finish = [math.nan] * n
        self.offsets = [0] * n
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.next_i = 0
        self.handled = 0

    def push(self, t: float, kind: int, x: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, x))

    def horizon(self) -> float:
        """Time of the next thing that can change any worker's state."""
        nxt = self.arrival[self.next_i]
        return min(self.events[0][0], nxt) if self.events else nxt

    def run(self) -> RunResult:
        ev, arrival, n = self.events, self.arrival, len(self.wl)
        pop, arrive, handle = heapq.heappop, self.arrive, self.handle
        while True:
            i = self.next_i
            if ev and ev[0][0] < arrival[i]:
                t, _, kind, x = pop(ev)
                handle(kind, x, t)
            elif i < n:
                self.next_i = i + 1
                arrive(i, arrival[i])
            else:
                break
            self.handled += 1
        # The cluster's per-request latency (hops, admission) delays every token of a request alike.
        late = self.cluster.prefill.profile.serving.request_s
        first, finish = np.asarray(self.first) + late, np.asarray(self.finish) + late
        return RunResult(self.cluster, self.wl, first, finish, self.busy(), self.handled)

    def arrive(self, r: int, t: float) -> None:
        raise NotImplementedError

    def handle(self, kind: int, x: int, t: float) -> None:
        raise NotImplementedError

    def busy(self) -> dict[str, float]:
        raise NotImplementedError

    def decode_time_fn(self, pool: PoolSpec):  # type: ignore[no-untyped-def]
        """A decode step's time, the worker loop's own overhead included."""
        d = pool.profile.decode
        base, per_seq, per_ctx = d.base_s + pool.profile.serving.step_s, d.per_seq_s, d.per_context_token_s
        return lambda n, ctx: base + per_seq * n + per_ctx * ctx

    def prefill_time_fn(self, pool: PoolSpec):  # type: ignore[no-untyped-def]
        """A prefill pass's time, the worker loop's own overhead included."""
        prefill_time, step = pool.profile.prefill_time, pool.profile.serving.step_s
        return lambda tokens: prefill_time(tokens) + step


class _Disaggregated(_Sim):
    """Prefill pool batches prompts (prepacking up to max_batch_tokens); KV moves; decode pool runs batches."""

    def __init__(self, cluster: ClusterSpec, wl: Workload) -> None:
        super().__init__(cluster, wl)
        pre, dec = cluster.prefill, cluster.decode
        assert dec is not None
        self.pre_pool, self.dec_pool = pre, dec
        xfer = pre.profile.kv_transfer[cluster.kv_backend]
        self.xfer = (
            xfer.latency_s + wl.prompt_tokens * (pre.profile.kv_bytes_per_token / xfer.bandwidth_bytes_per_s)
        ).tolist()
        self.prefill_time = self.prefill_time_fn(pre)
        self.decode_time = self.decode_time_fn(dec)
        self.queues: list[deque[int]] = [deque() for _ in range(pre.replicas)]
        self.pf_load = [0] * pre.replicas  # pending prompt tokens: queued + running
        self.pf_batch: list[list[int] | None] = [None] * pre.replicas
        self.pf_busy = 0.0
        self.batches = [DecodeBatch(dec) for _ in range(dec.replicas)]
        self.dec_load = [0] * dec.replicas  # reserved KV tokens of assigned, unfinished requests
        self.decode_of = [0] * len(wl)
        self.pf_router = Router(cluster.policy, pre.replicas)
        self.dec_router = Router(cluster.policy, dec.replicas)

    def arrive(self, r: int, t: float) -> None:
        w = self.pf_router.choose(self.pf_load)
        d = self.dec_router.choose(self.dec_load)
        self.decode_of[r] = d
        self.dec_load[d] += self.need[r]
        self.pf_load[w] += self.prompt[r]
        self.queues[w].append(r)
        if self.pf_batch[w] is None:
            self.start_prefill(w, t)

    def start_prefill(self, w: int, t: float) -> None:
        q, prompt = self.queues[w], self.prompt
        budget, max_reqs = self.pre_pool.max_batch_tokens, self.pre_pool.max_batch_requests
        batch: list[int] = []
        tokens = 0
        while q and len(batch) < max_reqs:
            p = prompt[q[0]]
            if batch and tokens + p > budget:
                break
            batch.append(q.popleft())
            tokens += p
        dt = self.prefill_time(tokens)
        self.pf_busy += dt
        self.pf_batch[w] = batch
        self.push(t + dt, PREFILL_DONE, w)

    def handle(self, kind: int, x: int, t: float) -> None:
        if kind == STEP_DONE:
            self.step_done(x, t)
            self.run_decode(x, t)
        elif kind == KV_ARRIVED:
            w = self.decode_of[x]
            b = self.batches[w]
            b.waiting.append(x)
            if not b.busy:
                self.run_decode(w, t)
        else:
            self.prefill_done(x, t)

    def prefill_done(self, w: int, t: float) -> None:
        batch = self.pf_batch[w]
        assert batch is not None
        first, out, xfer, load = self.first, self.out, self.xfer, self.pf_load
        for r in batch:
            first[r] = t
            load[w] -= self.prompt[r]
            if out[r] == 1:
                self.finish[r] = t
                self.dec_load[self.decode_of[r]] -= self.need[r]
            else:
                self.push(t + xfer[r], KV_ARRIVED, r)
        self.pf_batch[w] = None
        if self.queues[w]:
            self.start_prefill(w, t)

    def run_decode(self, w: int, t: float) -> None:
        """Admit waiting requests and run steps until one would end past the horizon (then it becomes an event)."""
        b, need, prompt, out, offsets = self.batches[w], self.need, self.prompt, self.out, self.offsets
        horizon, decode_time, wq = self.horizon(), self.decode_time, b.waiting
        while True:
            while wq and b.fits(need[wq[0]]):
                r = wq.popleft()
                b.kv_used += need[r]
                b.join(r, prompt[r], out[r] - 1, offsets)
            if b.n == 0:
                b.busy = False
                return
            dt = decode_time(b.n, b.context_tokens())
            b.busy_s += dt
            t += dt
            if t > horizon:
                b.busy = True
                self.push(t, STEP_DONE, w)
                return
            self.step_done(w, t)

    def step_done(self, w: int, t: float) -> None:
        b = self.batches[w]
        for r in b.complete_step(self.offsets):
            self.finish[r] = t
            b.kv_used -= self.need[r]
            self.dec_load[w] -= self.need[r]

    def busy(self) -> dict[str, float]:
        return {"prefill": self.pf_busy, "decode": sum(b.busy_s for b in self.batches)}


class _Colocated(_Sim):
    """One pool, chunked prefill (Sarathi): each step runs every decoding sequence plus prompt chunks that fill
    the token budget. Step time = max(decode_step(n, ctx), prefill(chunk + n)): whichever of memory-bound decode
    and compute-bound prefill dominates, plus the profile's ``mixed.extra_s`` when the step has both; a step with
    no chunk is a plain decode step."""

    def __init__(self, cluster: ClusterSpec, wl: Workload) -> None:
        super().__init__(cluster, wl)
        pool = cluster.prefill
        self.pool = pool
        self.prefill_time = self.prefill_time_fn(pool)
        self.decode_time = self.decode_time_fn(pool)
        self.mixed_extra = pool.profile.mixed.extra_s
        self.batches = [DecodeBatch(pool) for _ in range(pool.replicas)]
        self.prefilling: list[deque[int]] = [deque() for _ in range(pool.replicas)]
        self.completing: list[list[int]] = [[] for _ in range(pool.replicas)]
        self.left = list(self.prompt)  # prompt tokens not yet prefilled
        self.load = [0] * pool.replicas
        self.worker_of = [0] * len(wl)
        self.router = Router(cluster.policy, pool.replicas)

    def arrive(self, r: int, t: float) -> None:
        w = self.router.choose(self.load)
        self.worker_of[r] = w
        self.load[w] += self.need[r]
        b = self.batches[w]
        b.waiting.append(r)
        if not b.busy:
            self.run_mixed(w, t)

    def handle(self, kind: int, x: int, t: float) -> None:
        self.step_done(x, t)
        self.run_mixed(x, t)

    def run_mixed(self, w: int, t: float) -> None:
        b, pre, need, left = self.batches[w], self.prefilling[w], self.need, self.left
        horizon, wq, budget_max = self.horizon(), b.waiting, self.pool.max_batch_tokens
        while True:
            while wq and b.fits(need[wq[0]], extra_seqs=len(pre)):
                r = wq.popleft()
                b.kv_used += need[r]
                pre.append(r)
            if b.n == 0 and not pre:
                b.busy = False
                return
            budget = budget_max - b.n
            chunk = 0
            completing = self.completing[w]
            for r in pre:
                if budget <= 0:
                    break
                take = min(left[r], budget)
                left[r] -= take
                chunk += take
                budget -= take
                if left[r] == 0:
                    completing.append(r)
            for _ in completing:
                pre.popleft()  # prompts fill in FIFO order, so the finished ones are a prefix
            dt = self.decode_time(b.n, b.context_tokens()) if b.n else 0.0
            if chunk:
                dt = max(dt, self.prefill_time(chunk + b.n)) + (self.mixed_extra if b.n else 0.0)
            b.busy_s += dt
            t += dt
            if t > horizon:
                b.busy = True
                self.push(t, STEP_DONE, w)
                return
            self.step_done(w, t)

    def step_done(self, w: int, t: float) -> None:
        b, need, finish = self.batches[w], self.need, self.finish
        for r in b.complete_step(self.offsets):
            finish[r] = t
            b.kv_used -= need[r]
            self.load[w] -= need[r]
        completing = self.completing[w]
        for r in completing:
            self.first[r] = t
            if self.out[r] == 1:
                finish[r] = t
                b.kv_used -= need[r]
                self.load[w] -= need[r]
            else:
                b.join(r, self.prompt[r], self.out[r] - 1, self.offsets)
        completing.clear()

    def busy(self) -> dict[str, float]:
        return {"mixed": sum(b.busy_s for b in self.batches)}


def simulate(cluster: ClusterSpec, workload: Workload) -> RunResult:
    """Replay ``workload`` on ``cluster``; deterministic (ties broken by event order)."""
    sim = _Colocated(cluster, workload) if cluster.mode == "colocated" else _Disaggregated(cluster, workload)
    return sim.run()
