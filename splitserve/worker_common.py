"""Process setup shared by the prefill and decode worker actors."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections import OrderedDict

import ray
import torch

# How long a thread waiting for the GIL lets its holder run before forcing a switch (CPython's default: 5 ms). A
# worker's engine thread drops and retakes the GIL around every torch op and a waiting thread rarely wins those
# races, so other threads (the KV receiver, the actor's event loops) would wait out the whole interval at each
# acquire. The effect on KV landing and TPOT is in docs/benchmarks.md.
GIL_SWITCH_INTERVAL_S = 5e-4


def configure_worker_process() -> None:
    """Quiet, predictable workers: one intra-op thread per CPU worker (several share a small machine), and control
    threads that get the GIL promptly while the engine thread runs."""
    logging.basicConfig(
        level=os.environ.get("SPLITSERVE_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("SPLITSERVE_CPU_THREADS", "1")))


def describe_device(device: torch.device) -> dict[str, str | int]:
    info: dict[str, str | int] = {"device": str(device), "host": socket.gethostname(), "pid": os.getpid()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_uuid"] = str(getattr(props, "uuid", ""))
    return info


def node_address() -> str:
    """This node's address as Ray knows it (what peers on other nodes can reach); loopback outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # not inside a Ray worker
        pass
    return "127.0.0.1"


CONTROL_GROUP = "control"
CONCURRENCY_GROUPS = {CONTROL_GROUP: 64}
"""Ray concurrency groups of a worker actor. Aborts run in their own group (their own event loop thread), so under
a storm they do not wait for a turn among the thousands of data calls (prefill and decode streams) of the default
group's loop. A method in the control group must be safe to run beside the default loop's code: it shares state only
under a lock, through the engine thread, or by ``call_soon_threadsafe`` onto the default loop."""


class AbortedAttempts:
    """Attempts aborted before this worker saw them: Ray may deliver an abort before the call it cancels, and that
    call must then be refused rather than run for nobody. Bounded; the oldest are forgotten first."""

    def __init__(self, capacity: int = 4096):
        self._capacity = capacity
        self._aborted: OrderedDict[tuple[str, int], None] = OrderedDict()

    def add(self, request_id: str, attempt: int) -> None:
        self._aborted[(request_id, attempt)] = None
        while len(self._aborted) > self._capacity:
            self._aborted.popitem(last=False)

    def claim(self, request_id: str, attempt: int) -> bool:
        """True (once) when this attempt was aborted before it arrived."""
        key = (request_id, attempt)
        if key not in self._aborted:
            return False
        del self._aborted[key]
        return True


class RequestTimes:
    """When one event last happened here per request (wall clock, so times from several processes on one host
    compare): a worker logs when it freed each request's pages and when each abort reached it, which the
    abort-storm benchmark measures "abort to pages freed" with. Bounded; written from any thread."""

    def __init__(self, capacity: int = 16384):
        self._capacity = capacity
        self._times: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, request_id: str) -> None:
        with self._lock:
            self._times[request_id] = time.time()
            self._times.move_to_end(request_id)
            while len(self._times) > self._capacity:
                self._times.popitem(last=False)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._times)


class ReportsRequestTimes:
    """Gives a worker actor its ``release_times`` and ``abort_times`` calls, answered from the control group (no
    queueing)."""

    releases: RequestTimes
    aborts: RequestTimes

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def release_times(self) -> dict[str, float]:
        """Request id -> wall-clock time its pages were last freed here, for the most recent requests."""
        return self.releases.snapshot()

    @ray.method(concurrency_group=CONTROL_GROUP)
    async def abort_times(self) -> dict[str, float]:
        """Request id -> wall-clock time its last abort call reached this worker, for the most recent requests."""
        return self.aborts.snapshot()
