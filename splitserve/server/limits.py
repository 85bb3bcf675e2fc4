"""Per-client concurrency limit, so one client cannot take every slot of the cluster's admission queue."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from splitserve.cluster.messages import ErrorCode, ServingError


class ClientLimiter:
    def __init__(self, max_per_client: int):
        self.max_per_client = max_per_client
        self._inflight: Counter[str] = Counter()

    @contextmanager
    def slot(self, client: str) -> Iterator[None]:
        """Hold one of ``client``'s slots for the duration; RESOURCE_EXHAUSTED when none is free."""
        if self._inflight[client] >= self.max_per_client:
            raise ServingError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{self._inflight[client]} requests of this client in flight, the limit is"
                " server.max_concurrent_per_client; retry when one finishes",
            )
        self._inflight[client] += 1
        try:
            yield
        finally:
            self._inflight[client] -= 1
            if not self._inflight[client]:
                del self._inflight[client]
