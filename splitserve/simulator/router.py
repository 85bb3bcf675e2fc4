"""Router policies: which worker of a pool gets the next request, from the workers' current load."""

from __future__ import annotations

from splitserve.simulator.cluster import Policy


class Router:
    """``round_robin`` cycles; ``jsq`` and ``borrow_idle`` (jsq, plus the engine's idle fallback) join the
    least-loaded worker (load = pending prefill tokens or reserved KV)."""

    def __init__(self, policy: Policy, workers: int) -> None:
        self._jsq = policy != "round_robin"
        self._n = workers
        self._next = 0
        self._ids = range(workers)

    def choose(self, load: list[int]) -> int:
        if self._jsq:
            return min(self._ids, key=load.__getitem__)
        w = self._next
        self._next = (w + 1) % self._n
        return w
