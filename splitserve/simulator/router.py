"""Router policies: which worker of a pool gets the next request, from the workers' current load."""

from __future__ import annotations

from splitserve.simulator.cluster import Policy


class Router:
    """``round_robin`` cycles; ``jsq`` and ``borrow_idle`` (jsq, plus the engine's idle fallback) join the
    least-loaded worker (load = pending prefill tokens or reserved KV). ``cache_aware`` joins the worker of least
    ``load - saved``, ``saved`` being the tokens of the request's prefix it holds (prefill: not computed; decode: not
    transferred): a conversation goes back to the worker holding its prefix unless that worker's load exceeds the
    least loaded one's by more than what the prefix saves, which caps the load a prefix can attract."""

    def __init__(self, policy: Policy, workers: int) -> None:
        self._jsq = policy != "round_robin"
        self._cache_aware = policy == "cache_aware"
        self._n = workers
        self._next = 0
        self._ids = range(workers)

    def choose(self, load: list[int], saved: list[int] | None = None) -> int:
        """``saved`` counts only under ``cache_aware`` (without it, ``cache_aware`` is ``jsq``)."""
        if saved is not None and self._cache_aware:
            return min(self._ids, key=lambda w: load[w] - saved[w])
        if self._jsq:
            return min(self._ids, key=load.__getitem__)
        w = self._next
        self._next = (w + 1) % self._n
        return w
