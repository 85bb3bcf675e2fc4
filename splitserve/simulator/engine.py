"""The discrete-event simulation: one heap of timed events, the runtime's scheduling replayed on a profile.

Events are per batch, not per token: a prefill batch end, a KV transfer end, a stepping worker's step end, and
(with ``serving.ingress_s``) a request reaching its worker's engine. A decode worker runs its steps inline, without
the heap, until its next step would end after the earliest pending event or arrival, the only things that could
change its batch.

A workload of conversations (``Workload.conversations``) is closed loop per conversation: a follow-up turn arrives
(a ``NEXT_TURN`` event) its think time after the client got the previous turn's last token. Every worker then keeps
a ``PrefixCache``: a prefill (or colocated) worker computes only the prompt past its cached prefix of the
conversation, and a decode worker that still holds the conversation's KV receives only the rest of the prompt's KV,
or, under ``cache_aware`` with at most ``local_prefill_max_tokens`` of it left, prefills that rest itself.
A prefill worker caches the prompts it computed; a decode (or colocated) worker the whole context it ended with
(prompt and answer, less the last token, whose KV is never computed).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from splitserve.cluster.router import DECODE_IDLE_OCCUPANCY, PREFILL_BACKLOG_TOKENS
from splitserve.simulator.batch import DecodeBatch
from splitserve.simulator.cluster import ClusterSpec, PoolSpec
from splitserve.simulator.prefix import PrefixCache
from splitserve.simulator.router import Router
from splitserve.simulator.workload import Workload

PREFILL_DONE, KV_ARRIVED, STEP_DONE, INGRESSED, NEXT_TURN = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class PrefixStats:
    """Per request of a conversation workload: the prompt tokens found in a prefix cache (not computed) and the KV
    tokens transferred to the decode worker (0 colocated, or for a one-token answer)."""

    cached_tokens: np.ndarray
    moved_tokens: np.ndarray


@dataclass(frozen=True)
class RunResult:
    """Raw per-request times (seconds from the first arrival) and per-pool busy GPU-seconds. ``workload`` has the
    arrival every follow-up turn got; ``prefix`` is set for a workload of conversations."""

    cluster: ClusterSpec
    workload: Workload
    first_token_s: np.ndarray
    finish_s: np.ndarray
    busy_s: dict[str, float]
    events: int
    prefix: PrefixStats | None = None


class _Sim:
    """Shared state and the event loop; subclasses implement one serving mode."""

    def __init__(self, cluster: ClusterSpec, wl: Workload) -> None:
        self.cluster = cluster
        self.wl = wl
        n = len(wl)
        conv = wl.conversations
        # Requests whose arrival is known up front, in order of arrival; a follow-up turn arrives as an event.
        self.open_ids = list(range(n)) if conv is None else np.flatnonzero(conv.previous < 0).tolist()
        self.arrival = [*wl.arrival_s[self.open_ids].tolist(), math.inf]  # sentinel: "no more arrivals"
        self.prompt = wl.prompt_tokens.tolist()
        serving = cluster.prefill.profile.serving
        # The cluster's per-request latency (hops, admission, the prompt's own) delays every token of a request alike.
        self.late = serving.request_s + serving.prompt_token_s * wl.prompt_tokens
        self.multiturn = conv is not None
        self.cache_aware = cluster.policy == "cache_aware" and self.multiturn
        if conv is not None:
            self.arrival_s = wl.arrival_s.copy()
            self.conv_of, self.prefix_of = conv.conversation.tolist(), conv.prefix_tokens.tolist()
            self.previous, self.think = conv.previous.tolist(), conv.think_s.tolist()
            self.next_turn = [-1] * n
            for r, p in enumerate(self.previous):
                if p >= 0:
                    self.next_turn[p] = r
        self.cached = [0] * n
        self.moved = [0] * n
        self.out = wl.output_tokens.tolist()
        self.need = (wl.prompt_tokens + wl.output_tokens).tolist()
        self.first = [math.nan] * n
        self.finish = [math.nan] * n
        self.offsets = [0] * n
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.next_i = 0
        self.handled = 0
        self.ingress_s = cluster.prefill.profile.serving.ingress_s

    def push(self, t: float, kind: int, x: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, x))

    def horizon(self) -> float:
        """Time of the next thing that can change any worker's state."""
        nxt = self.arrival[self.next_i]
        return min(self.events[0][0], nxt) if self.events else nxt

    def run(self) -> RunResult:
        ev, arrival, open_ids = self.events, self.arrival, self.open_ids
        pop, arrive, handle, n = heapq.heappop, self.arrive, self.handle, len(open_ids)
        while True:
            i = self.next_i
            if ev and ev[0][0] < arrival[i]:
                t, _, kind, x = pop(ev)
                handle(kind, x, t)
            elif i < n:
                self.next_i = i + 1
                arrive(open_ids[i], arrival[i])
            else:
                break
            self.handled += 1
        first, finish = np.asarray(self.first) + self.late, np.asarray(self.finish) + self.late
        if not self.multiturn:
            return RunResult(self.cluster, self.wl, first, finish, self.busy(), self.handled)
        wl = replace(self.wl, arrival_s=self.arrival_s)
        stats = PrefixStats(np.asarray(self.cached), np.asarray(self.moved))
        return RunResult(self.cluster, wl, first, finish, self.busy(), self.handled, stats)

    def finished(self, r: int, t: float, w: int) -> None:
        """A conversation's turn ``r`` produced its last token at ``t`` on stepping worker ``w`` (-1: on its prefill
        worker): ``w`` caches the context, and the next turn is due after the think time."""
        if w >= 0:
            b = self.batches[w]
            self.caches[w].put(self.conv_of[r], self.prompt[r] + self.out[r] - 1, b.cap - b.kv_used)
        nxt = self.next_turn[r]
        if nxt >= 0:
            self.push(t + self.late[r] + self.think[nxt], NEXT_TURN, nxt)

    def turn_due(self, r: int, t: float) -> None:
        """Follow-up turn ``r`` arrives, unless its previous turn's last token moved later meanwhile (an overlapped
        step held it back): then at the new time."""
        p = self.previous[r]
        due = self.finish[p] + self.late[p] + self.think[r]
        if due > t:
            self.push(due, NEXT_TURN, r)
            return
        self.arrival_s[r] = t
        self.arrive(r, t)

    def saved(self, caches: list[PrefixCache], r: int, computed: bool) -> list[int]:
        """Per worker, the tokens of ``r``'s prefix it holds: ``computed``, those its prefill can skip (never the
        last prompt token); else those its KV transfer can skip."""
        c, limit = self.conv_of[r], min(self.prefix_of[r], self.prompt[r] - 1 if computed else self.prompt[r])
        return [min(cache.held(c), limit) for cache in caches]

    def take_prefix(self, cache: PrefixCache, r: int) -> int:
        """The prompt tokens of ``r`` that ``cache`` holds, now ``r``'s (at least its last token is computed: its
        logits give the first output token)."""
        hit = min(cache.take(self.conv_of[r]), self.prefix_of[r], self.prompt[r] - 1)
        self.cached[r] = hit
        return hit

    def arrive(self, r: int, t: float) -> None:
        raise NotImplementedError

    def send(self, r: int, t: float) -> None:
        """``r`` leaves the router for its worker's engine, which it reaches ``ingress_s`` later (0: at once)."""
        if self.ingress_s:
            self.push(t + self.ingress_s, INGRESSED, r)
        else:
            self.land(r, t)

    def ingressed(self, r: int, t: float) -> None:
        """``r`` is at its worker. On a stepping worker its admission runs beside a step, while the engine waits for
        the device, which a step with a prompt chunk (an eager launch) never does: during one, it is admitted once
        that step ends, after the next step has been launched (this event is then pushed after that step's)."""
        end = self.admission_blocked_until(r)
        if end > t:
            self.push(end, INGRESSED, r)
        else:
            self.land(r, t)

    def admission_blocked_until(self, r: int) -> float:
        return self.prompt_launch_end[self.worker_of[r]]

    def land(self, r: int, t: float) -> None:
        """``r`` reached its engine: it waits to be prefilled on its stepping worker."""
        self.enqueue(r, t)

    def handle(self, kind: int, x: int, t: float) -> None:
        raise NotImplementedError

    def beside_prefill_s(self, w: int, t: float, dt: float) -> float:
        """What a step of ``dt`` from ``t`` on worker ``w`` gains from sharing its GPU with a prefill worker."""
        raise NotImplementedError

    def busy(self) -> dict[str, float]:
        raise NotImplementedError

    def init_workers(self, pools: list[PoolSpec]) -> None:
        """The workers that step continuous batches (decode and hybrid pools, or the colocated replicas), in order
        of ``pools``; each step runs every decoding sequence plus prompt chunks that fill the worker's token
        budget (Sarathi). A request either joins decoding directly (its KV arrived: ``left`` is 0) or is prefilled
        there first, chunk by chunk."""
        self.batches: list[DecodeBatch] = []
        self.step_fns: list[tuple] = []  # per worker: (step time of a shape, token budget, overlapped steps)
        for pool in pools:
            for _ in range(pool.replicas):
                self.batches.append(DecodeBatch(pool))
                self.step_fns.append((pool.profile.step_time, pool.max_batch_tokens, pool.overlap_decode))
        workers = len(self.batches)
        self.prompt_launch_end = [-math.inf] * workers  # when each worker's latest step with a prompt chunk ends
        self.gpu_mate = [-1] * workers  # the prefill worker sharing each stepping worker's GPU (-1: none)
        # Per worker: the requests whose first or last token the step that just ended produced (a step with a
        # prompt chunk launched right after it holds them back until it ends, when steps overlap).
        self.delivered: list[list[int]] = [[] for _ in range(workers)]
        self.prefilling: list[deque[int]] = [deque() for _ in range(workers)]
        self.completing: list[list[int]] = [[] for _ in range(workers)]
        self.load = [0] * workers  # reserved KV tokens of assigned, unfinished requests
        self.caches = [PrefixCache() for _ in range(workers)]  # used only for a workload of conversations
        self.worker_of = [0] * len(self.wl)
        self.left = [0] * len(self.wl)  # prompt tokens a stepping worker has still to prefill

    def assign(self, r: int, w: int, t: float, prefill_here: bool) -> None:
        """Book request ``r`` on stepping worker ``w``; ``prefill_here``: it is prefilled there too."""
        self.worker_of[r] = w
        self.load[w] += self.need[r]
        if prefill_here:
            self.left[r] = self.prompt[r] - (self.take_prefix(self.caches[w], r) if self.multiturn else 0)
            self.send(r, t)

    def enqueue(self, r: int, t: float) -> None:
        """``r`` waits for admission on its worker (its KV arrived, or it is to be prefilled there)."""
        w = self.worker_of[r]
        b = self.batches[w]
        b.waiting.append(r)
        if not b.busy:
            self.run_steps(w, t)

    def run_steps(self, w: int, t: float) -> None:
        """Admit waiting requests and run steps until one would end past the horizon (then it becomes an event).
        A step's time is the profile's for its shape (``Profile.step_time``). With overlapped steps, the tokens of a
        step are read back once the next step is launched: after a step with a prompt chunk, whose eager launch
        takes about its whole time, so the first and last tokens of the step before count from its end (and a
        request reaching the worker meanwhile waits for it to end: ``ingressed``)."""
        b, pre, need, left, prompt, out, offsets = (
            self.batches[w],
            self.prefilling[w],
            self.need,
            self.left,
            self.prompt,
            self.out,
            self.offsets,
        )
        step_time, budget_max, overlap = self.step_fns[w]
        horizon, wq, completing, delivered = self.horizon(), b.waiting, self.completing[w], self.delivered[w]
        first, finish = self.first, self.finish
        launch_end = self.prompt_launch_end
        shared = self.gpu_mate[w] >= 0
        cache = self.caches[w] if self.multiturn else None
        while True:
            while wq and b.fits(need[wq[0]], extra_seqs=len(pre)):
                r = wq.popleft()
                b.kv_used += need[r]
                if cache is not None:
                    cache.evict_to(b.cap - b.kv_used)
                if left[r]:
                    pre.append(r)
                else:
                    b.join(r, prompt[r], out[r] - 1, offsets)
            if b.n == 0 and not pre:
                b.busy = False
                delivered.clear()
                return
            chunk = 0
            if pre:
                budget = budget_max - b.n
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
            dt = step_time(chunk, b.n, b.context_tokens() if b.n else 0)
            if shared:
                dt += self.beside_prefill_s(w, t, dt)
            if chunk and overlap:
                for r in delivered:  # stamped at t by the step that just ended
                    if first[r] == t:
                        first[r] = t + dt
                    if finish[r] == t:
                        finish[r] = t + dt
            delivered.clear()
            if chunk:
                launch_end[w] = t + dt
            b.busy_s += dt
            t += dt
            if t > horizon:
                b.busy = True
                self.push(t, STEP_DONE, w)
                return
            self.step_done(w, t)

    def step_done(self, w: int, t: float) -> None:
        b, need, finish, load, delivered = self.batches[w], self.need, self.finish, self.load, self.delivered[w]
        multiturn = self.multiturn
        for r in b.complete_step(self.offsets):
            finish[r] = t
            b.kv_used -= need[r]
            load[w] -= need[r]
            delivered.append(r)
            if multiturn:
                self.finished(r, t, w)
        completing = self.completing[w]
        delivered += completing
        for r in completing:  # prompts prefilled here: their first token came with this step
            self.first[r] = t
            if self.out[r] == 1:
                finish[r] = t
                b.kv_used -= need[r]
                load[w] -= need[r]
                if multiturn:
                    self.finished(r, t, w)
            else:
                b.join(r, self.prompt[r], self.out[r] - 1, self.offsets)
        completing.clear()


class _Disaggregated(_Sim):
    """Prefill pool batches prompts (prepacking up to max_batch_tokens); KV moves; decode pool runs batches. While
    every prefill worker is backed up, a hybrid-pool worker (or, under the ``borrow_idle`` policy, an idle decode
    worker)
    runs the whole request, as the runtime's router does."""

    def __init__(self, cluster: ClusterSpec, wl: Workload) -> None:
        super().__init__(cluster, wl)
        pre, dec = cluster.prefill, cluster.decode
        assert dec is not None
        self.pre_pool = pre
        xfer = pre.profile.kv_transfer[cluster.kv_backend]
        self.xfer_latency = xfer.latency_s
        self.token_link_s = pre.profile.kv_bytes_per_token / xfer.bandwidth_bytes_per_s  # one token's KV on a link
        self.egress_free = [-math.inf] * pre.replicas  # when each prefill worker's link is next free
        step_time, pre_profile = pre.profile.step_time, pre.profile
        self.prefill_time = lambda tokens: step_time(tokens, 0, 0)  # a prefill pass: a step with no decodes
        # Beside decode steps on a shared GPU, a pass gets only part of the device; its host-bound floor stays.
        self.device_prefill_time = lambda tokens: pre_profile.prefill_time(tokens) + pre_profile.serving.step_s
        self.prefill_slowdown = 0.0
        self.queues: list[deque[int]] = [deque() for _ in range(pre.replicas)]
        self.pf_load = [0] * pre.replicas  # pending prompt tokens to compute: queued + running
        self.pf_cost = [0] * len(wl)  # what each request added to its prefill worker's pf_load
        self.pf_caches = [PrefixCache() for _ in range(pre.replicas)]  # used only for a workload of conversations
        self.pf_cap = pre.profile.kv_capacity_tokens
        self.pf_batch: list[list[int] | None] = [None] * pre.replicas
        self.pf_span = [(-math.inf, -math.inf)] * pre.replicas  # each prefill worker's latest batch
        self.prefill_of = [-1] * len(wl)  # the prefill worker of each request (-1: prefilled where it decodes)
        self.pf_busy = 0.0
        hybrid = cluster.hybrid
        self.init_workers([dec] if hybrid is None else [dec, hybrid])
        self.n_decode = dec.replicas  # decode workers first, then the hybrid pool's
        self.ingress_free = [-math.inf] * len(self.batches)  # when each stepping worker's link is next free
        if cluster.shared_gpus:
            self.gpu_mate[: dec.replicas] = range(dec.replicas)
            self.shared_slowdown = dec.profile.serving.shared_gpu_slowdown
            self.prefill_slowdown = pre.profile.serving.shared_gpu_prefill_slowdown
        self.pf_router = Router(cluster.policy, pre.replicas)
        self.dec_router = Router(cluster.policy, len(self.batches), cluster.decode_prefix_weight)
        self.hybrid_router = Router(cluster.policy, hybrid.replicas) if hybrid is not None else None
        self.idle_fallback = cluster.policy == "borrow_idle"
        self.incremental = self.multiturn and cluster.incremental_transfer
        self.local_max = cluster.local_prefill_max_tokens

    def arrive(self, r: int, t: float) -> None:
        saved_pf = saved_dec = alone = None
        if self.cache_aware:  # what each worker holds of the conversation: the router's prefix index, exact
            saved_pf = self.saved(self.pf_caches, r, computed=True)
            if self.incremental:
                alone = self.runs_alone(r)
                # A worker that would run it alone receives none of its KV.
                saved = self.saved(self.caches, r, computed=False)
                saved_dec = [self.prompt[r] if a else s for a, s in zip(alone, saved, strict=True)]
        d = self.dec_router.choose(self.load, saved_dec)
        if alone is not None and alone[d]:  # the runtime's conditional disaggregation (``Router.place``)
            self.assign(r, d, t, prefill_here=True)
            return
        w = self.pf_router.choose(self.pf_load, saved_pf)
        if self.pf_load[w] >= PREFILL_BACKLOG_TOKENS:
            local = self.overflow(d)
            if local is not None:
                self.assign(r, local, t, prefill_here=True)
                return
        self.assign(r, d, t, prefill_here=False)
        # The router counts it as it sends it; a cache-blind one, its whole prompt.
        self.pf_cost[r] = self.prompt[r] - (saved_pf[w] if saved_pf is not None else 0)
        self.pf_load[w] += self.pf_cost[r]
        self.prefill_of[r] = w
        self.send(r, t)

    def admission_blocked_until(self, r: int) -> float:
        # A prefill worker queues a request between its batches, so one that comes during a batch joins the next.
        return -math.inf if self.prefill_of[r] >= 0 else super().admission_blocked_until(r)

    def land(self, r: int, t: float) -> None:
        w = self.prefill_of[r]
        if w < 0:
            super().land(r, t)
            return
        self.queues[w].append(r)
        if self.pf_batch[w] is None:
            self.start_prefill(w, t)

    def runs_alone(self, r: int) -> list[bool]:
        """Per stepping worker, whether it holds ``r``'s prefix, all but at most ``local_max`` prompt tokens: then
        it prefills the rest itself (``cache_aware``)."""
        held = self.saved(self.caches, r, computed=True)
        return [h > 0 and self.prompt[r] - h <= self.local_max for h in held]

    def overflow(self, d: int) -> int | None:
        """The worker that runs a whole request while prefill is backed up (``Router._overflow`` of the runtime)."""
        if self.hybrid_router is not None:
            return self.n_decode + self.hybrid_router.choose(self.load[self.n_decode :])
        b = self.batches[d]
        if self.idle_fallback and self.load[d] <= DECODE_IDLE_OCCUPANCY * b.cap:
            return d
        return None

    def start_prefill(self, w: int, t: float) -> None:
        """The next batch: prompts in FIFO order within the token budget, each costing the tokens it computes."""
        q, prompt = self.queues[w], self.prompt
        budget, max_reqs = self.pre_pool.max_batch_tokens, self.pre_pool.max_batch_requests
        cache = self.pf_caches[w] if self.multiturn else None
        batch: list[int] = []
        tokens = 0
        while q and len(batch) < max_reqs:
            r = q[0]
            p = prompt[r]
            if cache is not None:
                p -= min(cache.held(self.conv_of[r]), self.prefix_of[r], p - 1)
            if batch and tokens + p > budget:
                break
            batch.append(q.popleft())
            tokens += p
            if cache is not None:
                self.take_prefix(cache, r)
        if cache is not None:  # the batch's prompts, cached parts included, are in KV until they are sent
            cache.evict_to(self.pf_cap - sum(prompt[r] for r in batch))
        dt = self.prefill_time(tokens)
        if self.prefill_slowdown and self.batches[w].busy:  # decode worker w shares prefill worker w's GPU
            dt = max(dt, self.device_prefill_time(tokens) / (1.0 - self.prefill_slowdown))
        self.pf_span[w] = (t, t + dt)
        self.pf_busy += dt
        self.pf_batch[w] = batch
        self.push(t + dt, PREFILL_DONE, w)

    def beside_prefill_s(self, w: int, t: float, dt: float) -> float:
        # The step runs at (1 - slowdown) of its speed until the prefill batch running at its launch ends (one
        # started meanwhile is not known yet): it gains slowdown x the time it spends beside that batch.
        end, slow = self.pf_span[self.gpu_mate[w]][1], self.shared_slowdown
        return slow * min(end - t, dt / (1.0 - slow)) if end > t else 0.0

    def handle(self, kind: int, x: int, t: float) -> None:
        if kind == STEP_DONE:
            self.step_done(x, t)
            self.run_steps(x, t)
        elif kind == KV_ARRIVED:
            self.enqueue(x, t)
        elif kind == PREFILL_DONE:
            self.prefill_done(x, t)
        elif kind == INGRESSED:
            self.ingressed(x, t)
        else:
            self.turn_due(x, t)

    def prefill_done(self, w: int, t: float) -> None:
        """The batch's first tokens, and its KV on the way. Its KV streams layer by layer while the batch computes
        (as in the runtime). Each link, the prefill worker's out and the decode worker's in, carries one request's
        bytes at a time, in order (the batch's requests after earlier transfers), for ``bytes / bandwidth`` from the
        batch's start or once it is free; the KV lands ``latency_s`` after the later of the two links' last byte
        and the batch's end. A link is busy only for its own bytes: a transfer waiting for the other link does not
        hold it."""
        batch = self.pf_batch[w]
        assert batch is not None
        first, out, load, worker_of = self.first, self.out, self.pf_load, self.worker_of
        egress, ingress, prompt = self.egress_free, self.ingress_free, self.prompt
        start = self.pf_span[w][0]
        multiturn, incremental = self.multiturn, self.incremental
        for r in batch:
            first[r] = t
            load[w] -= self.pf_cost[r]
            if multiturn:
                self.pf_caches[w].put(self.conv_of[r], prompt[r], self.pf_cap)
            if out[r] == 1:
                self.finish[r] = t
                self.load[worker_of[r]] -= self.need[r]
                if multiturn:
                    self.finished(r, t, -1)
            else:
                d = worker_of[r]
                # Incremental transfer: only the KV the decode worker does not hold from the conversation.
                moved = prompt[r] - (min(self.caches[d].take(self.conv_of[r]), self.prefix_of[r]) if incremental else 0)
                self.moved[r] = moved
                link_s = moved * self.token_link_s
                egress[w] = max(start, egress[w]) + link_s
                ingress[d] = max(start, ingress[d]) + link_s
                self.push(max(egress[w], ingress[d], t) + self.xfer_latency, KV_ARRIVED, r)
        self.pf_batch[w] = None
        if self.queues[w]:
            self.start_prefill(w, t)

    def busy(self) -> dict[str, float]:
        busy = {"prefill": self.pf_busy, "decode": sum(b.busy_s for b in self.batches[: self.n_decode])}
        if self.hybrid_router is not None:
            busy["hybrid"] = sum(b.busy_s for b in self.batches[self.n_decode :])
        return busy


class _Colocated(_Sim):
    """One pool of replicas, each prefilling its own requests in chunks beside its decodes (``run_steps``)."""

    def __init__(self, cluster: ClusterSpec, wl: Workload) -> None:
        super().__init__(cluster, wl)
        self.init_workers([cluster.prefill])
        self.router = Router(cluster.policy, cluster.prefill.replicas)

    def arrive(self, r: int, t: float) -> None:
        saved = self.saved(self.caches, r, computed=True) if self.cache_aware else None
        self.assign(r, self.router.choose(self.load, saved), t, prefill_here=True)

    def handle(self, kind: int, x: int, t: float) -> None:
        if kind == STEP_DONE:
            self.step_done(x, t)
            self.run_steps(x, t)
        elif kind == INGRESSED:
            self.ingressed(x, t)
        else:
            self.turn_due(x, t)

    def busy(self) -> dict[str, float]:
        return {"colocated": sum(b.busy_s for b in self.batches)}


def simulate(cluster: ClusterSpec, workload: Workload) -> RunResult:
    """Replay ``workload`` on ``cluster``; deterministic (ties broken by event order)."""
    sim = _Colocated(cluster, workload) if cluster.mode == "colocated" else _Disaggregated(cluster, workload)
    return sim.run()
