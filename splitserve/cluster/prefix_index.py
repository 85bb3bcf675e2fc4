"""The router's picture of every worker's prefix cache: which chained block hashes each one holds.

Workers send the hashes their engine's prefix cache stored and evicted (``CacheEvents``, batched on their channel
after each engine step). A chained hash names a block together with everything before it, so a set of hashes per
worker is a prefix tree in disguise: a prompt's cached prefix on a worker is its leading run of block hashes found
in that worker's set. The router hashes prompts with the engine's own function (``prefix_block_hashes``).

The index only steers placement; the engine decides what it reuses by its own cache. So an event that is late or
lost costs at most a recompute (a stale hit) or a missed reuse (an unknown block), never a wrong token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from splitserve.engine.block_manager import CacheEvents, prefix_block_hashes, reusable_blocks


@dataclass
class _Held:
    block_size: int
    hashes: set[bytes] = field(default_factory=set)


class _PromptHashes:
    """A prompt's block hashes per block size, computed as far as some worker's match needs, once."""

    def __init__(self, prompt: Sequence[int]) -> None:
        self._prompt = prompt
        self._by_size: dict[int, tuple[list[bytes], Iterator[bytes]]] = {}

    def at(self, block_size: int, i: int) -> bytes:
        """Block ``i``'s hash (the caller never asks past the prompt's full blocks)."""
        if block_size not in self._by_size:
            self._by_size[block_size] = ([], prefix_block_hashes(self._prompt, block_size))
        done, rest = self._by_size[block_size]
        while len(done) <= i:
            done.append(next(rest))
        return done[i]


class PrefixIndex:
    def __init__(self) -> None:
        self._workers: dict[str, _Held] = {}

    def add_worker(self, worker_id: str, block_size: int) -> None:
        """A worker that just started: its cache is empty."""
        self._workers[worker_id] = _Held(block_size)

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def apply(self, worker_id: str, events: CacheEvents) -> None:
        """The worker's cache changes, in the order it sent them. A worker not (or no longer) here is ignored."""
        held = self._workers.get(worker_id)
        if held is None:
            return
        held.hashes.update(events.stored)
        held.hashes.difference_update(events.removed)

    def blocks(self, worker_id: str) -> int:
        held = self._workers.get(worker_id)
        return 0 if held is None else len(held.hashes)

    def cached_tokens(self, prompt: Sequence[int], workers: Iterable[str]) -> dict[str, int]:
        """Per worker, the leading tokens of ``prompt`` its cache holds, as its engine would reuse them (whole
        blocks, never the one holding the last token). A worker the index does not know holds nothing."""
        hashes = _PromptHashes(prompt)
        cached: dict[str, int] = {}
        for worker_id in workers:
            held = self._workers.get(worker_id)
            if held is None:
                cached[worker_id] = 0
                continue
            n = 0
            while n < reusable_blocks(len(prompt), held.block_size) and hashes.at(held.block_size, n) in held.hashes:
                n += 1
            cached[worker_id] = n * held.block_size
        return cached
