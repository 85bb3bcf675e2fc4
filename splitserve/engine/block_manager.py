"""Paged KV bookkeeping: a block allocator with reference counts and a prefix cache of full blocks.

A block is ``block_size`` token slots in every layer's K and V cache. Sequences own lists of block ids (block
tables). Full blocks are keyed by a hash chained over the prompt prefix, so a repeated prefix (a system prompt)
maps to blocks already computed; freed blocks keep their hash until reused, so they serve as an LRU cache.

With ``record_events`` the manager also notes which hashes enter and leave the cache (``take_events``): a worker
sends them to the router, whose prefix index (``cluster/prefix_index.py``) hashes prompts with
``prefix_block_hashes`` as this module does.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks right now; the caller queues or preempts."""

    def __init__(self, needed: int, free: int):
        super().__init__(f"need {needed} KV blocks, {free} free")
        self.needed = needed
        self.free = free


def block_hash(parent: bytes | None, token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Identity of a full block: its tokens and everything before them."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> Iterator[bytes]:
    """The chained hashes of the full blocks of ``token_ids``, first block first (lazily: a caller stops at its
    first miss). The one way a block is named, in the engine's cache and in the router's index."""
    ids = np.asarray(token_ids, dtype=np.int64)
    parent: bytes | None = None
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = block_hash(parent, ids[start : start + block_size])
        yield parent


def reusable_blocks(num_tokens: int, block_size: int) -> int:
    """How many leading full blocks of a prompt of ``num_tokens`` the cache may serve: never the block holding the
    last token, whose logits are needed for the first output token."""
    return max(num_tokens - 1, 0) // block_size


@dataclass
class CacheEvents:
    """Hashes that entered (``stored``) and left (``removed``) the prefix cache since the last ``take_events``."""

    stored: list[bytes]
    removed: list[bytes]


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


@dataclass
class BlockStats:
    num_blocks: int
    free: int
    used: int
    prefix_hits: int
    prefix_queries: int


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    record_events: bool = False  # note hashes entering and leaving the cache, for take_events
    _blocks: list[_Block] = field(init=False)
    # Free blocks in LRU order (oldest first). A free block may still carry a hash and be revived by a prefix hit.
    _free: OrderedDict[int, None] = field(init=False)
    _by_hash: dict[bytes, int] = field(init=False, default_factory=dict)
    prefix_hits: int = field(init=False, default=0)
    prefix_queries: int = field(init=False, default=0)
    # hash -> True (in the cache) / False (left it): the last change per hash since take_events, in order of change
    _events: dict[bytes, bool] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self._blocks = [_Block(i) for i in range(self.num_blocks)]
        self._free = OrderedDict((i, None) for i in range(self.num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def stats(self) -> BlockStats:
        return BlockStats(
            self.num_blocks, self.num_free, self.num_blocks - self.num_free, self.prefix_hits, self.prefix_queries
        )

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]
            self._note(block.hash, False)
        block.hash = None
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Fresh blocks with no prefix reuse (e.g. the destination of a KV transfer)."""
        if num_blocks > self.num_free:
            raise OutOfBlocks(num_blocks, self.num_free)
        return [self._take_free() for _ in range(num_blocks)]

    def allocate_prompt(self, token_ids: list[int]) -> tuple[list[int], int]:
        """Blocks for a prompt, reusing cached full blocks of its prefix.

        Returns the block table and how many leading tokens are already in the cache. At least the last prompt
        token is always recomputed, since its logits are needed for the first output token.
        """
        n_blocks = self.blocks_for(len(token_ids))
        table: list[int] = []
        cached_tokens = 0
        if self.enable_prefix_caching:
            full = reusable_blocks(len(token_ids), self.block_size)
            for h in itertools.islice(prefix_block_hashes(token_ids, self.block_size), full):
                self.prefix_queries += 1
                block_id = self._by_hash.get(h)
                if block_id is None:
                    break
                self.prefix_hits += 1
                table.append(block_id)
            cached_tokens = len(table) * self.block_size
        missing = n_blocks - len(table)
        # A free cached block revived by a hit no longer counts as free, so check against what is left.
        if missing > self.num_free - sum(1 for b in table if self._blocks[b].ref_count == 0):
            raise OutOfBlocks(missing, self.num_free)
        for block_id in table:
            self._ref(block_id)
        table.extend(self._take_free() for _ in range(missing))
        return table, cached_tokens

    def append_slot(self, table: list[int], num_tokens: int) -> None:
        """Grow ``table`` so it has room for ``num_tokens`` tokens (decode adds one token at a time)."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            raise OutOfBlocks(need, self.num_free)
        table.extend(self._take_free() for _ in range(need))

    def can_append(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(table) <= self.num_free

    def commit_full_blocks(self, table: list[int], token_ids: list[int]) -> None:
        """Publish the full blocks of ``token_ids`` (whose KV is now computed) to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        for block_id, h in zip(table, prefix_block_hashes(token_ids, self.block_size), strict=False):
            block = self._blocks[block_id]
            if block.hash is None:
                block.hash = h
                if self._by_hash.setdefault(h, block_id) == block_id:
                    self._note(h, True)

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list (newest last)."""
        for block_id in reversed(table):
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        table.clear()

    def reset_prefix_cache(self) -> None:
        for block_id in self._free:
            block = self._blocks[block_id]
            if block.hash is not None and self._by_hash.get(block.hash) == block_id:
                self._note(block.hash, False)
            block.hash = None
        self._by_hash = {h: b for h, b in self._by_hash.items() if self._blocks[b].ref_count > 0}

    def _note(self, h: bytes, stored: bool) -> None:
        if self.record_events:
            self._events.pop(h, None)  # re-inserted: the dict keeps the order of the last changes
            self._events[h] = stored

    def take_events(self) -> CacheEvents | None:
        """The cache's changes since the last call (only the last change of each hash), or None if there were none.
        Applied in order, they turn a copy of the hash set as of the last call into the set now."""
        if not self._events:
            return None
        events, self._events = self._events, {}
        return CacheEvents(stored=[h for h, s in events.items() if s], removed=[h for h, s in events.items() if not s])
