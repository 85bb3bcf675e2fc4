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
from typing import Generic, TypeVar

from splitserve.kv_transfer.errors import TransferError

log = logging.getLogger(__name__)
Payload = TypeVar("Payload")


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


class LayerCopies(Generic[Payload]):
    """One transfer's layer copies through an issuer: which were issued, and how long a stop or the end waits.

    ``copy(layer, payload)`` queues one layer's copy on the device; ``synchronize()`` returns once every copy queued
    so far has run. A copy is issued entirely before or after ``halt``."""

    def __init__(
        self, issuer: CopyIssuer, copy: Callable[[int, Payload], None], synchronize: Callable[[], None]
    ) -> None:
        self._issuer = issuer
        self._copy = copy
        self._synchronize = synchronize
        self._lock = threading.Condition()  # guards the fields below
        self._halted = False
        self._unissued = 0  # layers submitted and not yet issued (or skipped)
        self._failure: Exception | None = None
        self._written: list[int] = []

    def submit(self, layer: int, produced: Callable[[], None], payload: Payload) -> None:
        """Copy ``layer`` once ``produced`` returns; ``payload`` stays referenced until then."""
        with self._lock:
            if self._halted:
                return
            self._unissued += 1
        self._issuer.submit(CopyJob(produced, lambda failure: self._issue(layer, payload, failure)))

    def _issue(self, layer: int, payload: Payload, failure: Exception | None) -> None:
        with self._lock:
            try:
                if failure is not None:
                    self._failure = failure
                elif not self._halted and self._failure is None:
                    self._copy(layer, payload)
                    self._written.append(layer)
            except Exception as err:
                self._failure = err
            finally:
                self._unissued -= 1
                self._lock.notify_all()

    def halt(self) -> None:
        """Issue nothing more: the copies not issued yet never will be."""
        with self._lock:
            self._halted = True
            self._lock.notify_all()

    def drain(self) -> None:
        """Halted: wait for the copies issued. Otherwise for every submitted layer's copy, or raise why one failed."""
        with self._lock:
            self._lock.wait_for(lambda: self._halted or self._unissued == 0)
            if self._failure is not None and not self._halted:
                raise TransferError(f"copying a layer failed: {self._failure}")
        self._synchronize()

    def written(self) -> list[int]:
        with self._lock:
            return sorted(self._written)
