"""Router policies: which worker of a pool gets the next request, from the workers' current load."""

from __future__ import annotations

from splitserve.simulator.cluster import Policy


class Router:
    """``round_robin`` cycles; ``jsq`` and ``borrow_idle`` (jsq, plus the engine's idle fallback) join the
    least-loaded worker (load = pending prefill tokens or reserved KV). ``cache_aware`` joins the worker of least
    ``load - saved``, ``saved`` being the tokens of the request's prefix it holds (prefill: not computed; decode: not
    transferred), times ``prefix_weight``: a conversation goes back to the worker holding its prefix unless that
    worker's load exceeds the least loaded one's by more than ``prefix_weight`` x what the prefix saves, which caps
    the load a prefix can attract. On prefill both terms are tokens to compute (weight 1); on decode, load is KV
    reserved and the prefix is KV not transferred, so the weight says what a transferred token costs in balance."""

    def __init__(self, policy: Policy, workers: int, prefix_weight: float = 1.0) -> None:
        self._jsq = policy != "round_robin"
        self._cache_aware = policy == "cache_aware"
        self._prefix_weight = prefix_weight
        self._n = workers
        self._next = 0
        self._ids = range(workers)

    def choose(self, load: list[int], saved: list[int] | None = None) -> int:
        """``saved`` counts only under ``cache_aware`` (without it, ``cache_aware`` is ``jsq``)."""
        if saved is not None and self._cache_aware:
            return min(self._ids, key=lambda w: load[w] - self._prefix_weight * saved[w])
        if self._jsq:
            return min(self._ids, key=load.__getitem__)
        w = self._next
        self._next = (w + 1) % self._n
        return w
