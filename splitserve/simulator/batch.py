"""The continuous decode batch of one worker, kept in O(1) per step however many sequences it runs.

Each step advances every running sequence by one token. Instead of touching each sequence, the batch counts
steps: a sequence that joins after step ``k`` with ``m`` tokens to go finishes at step ``k + m`` (a heap of
finish steps), and the batch's total context during step ``j`` is ``sum(prompt_i - k_i) + n * j``.
"""

from __future__ import annotations

import heapq
from collections import deque

from splitserve.simulator.cluster import PoolSpec


class DecodeBatch:
    """KV reservation is prompt + output tokens at admission (no preemption); FIFO admission, head-of-line blocking."""

    __slots__ = ("busy", "busy_s", "cap", "ctx_offset", "finishing", "kv_used", "max_seqs", "n", "steps", "waiting")

    def __init__(self, pool: PoolSpec) -> None:
        self.cap = pool.profile.kv_capacity_tokens
        self.max_seqs = pool.max_batch_size
        self.waiting: deque[int] = deque()
        self.finishing: list[tuple[int, int]] = []  # (finish step, request)
        self.n = 0
        self.ctx_offset = 0
        self.kv_used = 0
        self.steps = 0
        self.busy = False
        self.busy_s = 0.0

    def fits(self, need: int, extra_seqs: int = 0) -> bool:
        """A request larger than the whole cache still runs, alone, rather than waiting forever."""
        return self.n + extra_seqs < self.max_seqs and (self.kv_used + need <= self.cap or self.kv_used == 0)

    def join(self, r: int, prompt: int, remaining: int, offsets: list[int]) -> None:
        """Start decoding request ``r``: it already has its first token and needs ``remaining`` more."""
        off = prompt - self.steps
        offsets[r] = off
        self.ctx_offset += off
        self.n += 1
        heapq.heappush(self.finishing, (self.steps + remaining, r))

    def context_tokens(self) -> int:
        """Tokens attention reads in the next step: prompt + tokens generated so far, summed over the batch."""
        return self.ctx_offset + self.n * (self.steps + 1)

    def complete_step(self, offsets: list[int]) -> list[int]:
        """Count one step done; return the requests that produced their last token in it."""
        self.steps += 1
        done: list[int] = []
        fin = self.finishing
        while fin and fin[0][0] == self.steps:
            r = heapq.heappop(fin)[1]
            done.append(r)
            self.ctx_offset -= offsets[r]
        self.n -= len(done)
        return done
