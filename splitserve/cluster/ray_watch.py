"""Watches that the Ray cluster under the server is still there, from a thread of its own.

When the GCS stops answering, or names this driver's node dead, nothing the cluster does can succeed again: no
worker can be restarted and no call reaches one. A supervisor can restart the whole server, so the watch reports
the loss and the server exits (see splitserve.launcher). It runs on a thread, not the event loop, because a Ray
call made on the loop (an actor's creation, a kill) can block it for as long as the GCS client keeps retrying.

Bound: the loss is reported at most ``RAY_GONE_AFTER × (RAY_PROBE_INTERVAL_S + RAY_PROBE_TIMEOUT_S)`` = 18 s after
Ray went away (three probes in a row failed, each waited on for at most its timeout).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import ray

log = logging.getLogger(__name__)

RAY_PROBE_INTERVAL_S = 2.0
RAY_PROBE_TIMEOUT_S = 4.0
# Consecutive failed probes that mean "gone": one slow GCS answer (a busy head node) is not a loss.
RAY_GONE_AFTER = 3
RAY_GONE_BOUND_S = RAY_GONE_AFTER * (RAY_PROBE_INTERVAL_S + RAY_PROBE_TIMEOUT_S)


def ray_problem() -> str | None:
    """Why this driver has no usable Ray cluster, or None while it has one. Makes one GCS call (the node table)."""
    if not ray.is_initialized():
        return "ray is not initialized in this process"
    node_id = ray.get_runtime_context().get_node_id()
    try:
        nodes = ray.nodes()
    except Exception as err:  # the GCS client's error types are not public; any failure here means no GCS
        return f"the Ray GCS refused the node table: {type(err).__name__}: {err}"
    mine = next((n for n in nodes if n.get("NodeID") == node_id), None)
    if mine is None or not mine.get("Alive", False):
        return f"the GCS lists this driver's Ray node {node_id[:12]} as dead"
    return None


class RayWatch:
    """Probes Ray every RAY_PROBE_INTERVAL_S; after RAY_GONE_AFTER failed probes in a row calls ``on_gone(reason)``
    once, from its thread, and stops."""

    def __init__(self, on_gone: Callable[[str], None], probe: Callable[[], str | None] = ray_problem):
        self._on_gone = on_gone
        self._probe_once = probe
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        failures = 0
        while not self._stopped.wait(RAY_PROBE_INTERVAL_S):
            problem = self._probe()
            if problem is None:
                failures = 0
                continue
            failures += 1
            log.warning("Ray liveness probe failed (%d/%d): %s", failures, RAY_GONE_AFTER, problem)
            if failures >= RAY_GONE_AFTER and not self._stopped.is_set():
                self._on_gone(problem)
                return

    def _probe(self) -> str | None:
        """One probe, waited on for at most RAY_PROBE_TIMEOUT_S: a GCS client that keeps retrying a dead GCS would
        block the call far longer. A probe that hangs is left behind on its own daemon thread."""
        answer: list[str | None] = []

        def probe() -> None:
            try:
                answer.append(self._probe_once())
            except Exception as err:
                answer.append(f"{type(err).__name__}: {err}")

        thread = threading.Thread(target=probe, name="ray-probe", daemon=True)
        thread.start()
        thread.join(RAY_PROBE_TIMEOUT_S)
        if not answer:
            return f"the Ray GCS did not answer in {RAY_PROBE_TIMEOUT_S:.0f} s"
        return answer[0]
