"""Issues device copies in order, each only once what it reads has been produced.

A copy queued on a CUDA stream behind an event stays queued until the event completes, and nothing can take it back.
A cuda_ipc writer that queued each layer's copy when the engine launched the layer (the host runs a whole prefill
pass ahead of the device) could therefore confirm a stop only once the whole pass had run. Queued here instead, a
layer's copy reaches the stream only after its layer is done, so a stopped writer's stream holds at most the copies
already running.

One thread per process serves every writer: the jobs come in the order their layers are launched on the engine's
stream, which is the order they complete in.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class CopyJob:
    produced: Callable[[], None]  # returns once the copy's input exists (blocks without holding the GIL)
    issue: Callable[[Exception | None], None]  # queues the copy or skips it; given why ``produced`` failed, if it did


class CopyIssuer:
    def __init__(self, name: str):
        self._name = name
        self._jobs: queue.SimpleQueue[CopyJob] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: CopyJob) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            failure: Exception | None = None
            try:
                job.produced()
            except Exception as err:  # a device error: the job's writer reports it; the others are still served
                failure = err
            try:
                job.issue(failure)
            except Exception:
                log.exception("%s: issuing a copy failed", self._name)
