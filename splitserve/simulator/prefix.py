"""A worker's prefix cache, per conversation: the model behind prefix hits and incremental KV transfer.

Token granularity, not blocks (the runtime caches whole blocks, so it may hold up to a block less per request).
An entry is a conversation's leading tokens whose KV the worker still has. It lives in KV the worker's running
requests do not use, so it is evicted least recently used first as they need more; a request that hits moves its
entry into its own KV reservation (``take``), and puts it back, longer, when it is done with it (``put``).
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    __slots__ = ("entries", "tokens")

    def __init__(self) -> None:
        self.entries: OrderedDict[int, int] = OrderedDict()  # conversation -> cached tokens, oldest use first
        self.tokens = 0

    def held(self, conversation: int) -> int:
        return self.entries.get(conversation, 0)

    def take(self, conversation: int) -> int:
        """Remove and return ``conversation``'s cached tokens (0 if none): a request now holds them."""
        tokens = self.entries.pop(conversation, 0)
        self.tokens -= tokens
        return tokens

    def put(self, conversation: int, tokens: int, room: int) -> None:
        """Cache ``tokens`` leading tokens of ``conversation`` (replacing a shorter entry), most recent, then evict to
        ``room``."""
        self.take(conversation)
        self.entries[conversation] = tokens
        self.tokens += tokens
        self.evict_to(room)

    def evict_to(self, room: int) -> None:
        """Drop the least recently used entries until the cache fits ``room`` tokens."""
        while self.tokens > room:
            _, tokens = self.entries.popitem(last=False)
            self.tokens -= tokens
