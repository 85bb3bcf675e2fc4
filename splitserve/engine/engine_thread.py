"""Runs an engine on one dedicated thread, so async actor code never blocks on a forward pass.

Every engine call goes through this thread (``submit``), which makes the engine single-threaded by construction:
no locks inside it. Between calls the thread runs ``step`` while it reports work, and sleeps on a condition
variable otherwise, so an idle worker burns no CPU.

A call that touches nothing a step in flight uses (reserving free pages, queueing a request for the next step) may
be submitted ``during_step``: the engine then also runs it while the device computes a step (``run_during_step``),
instead of after the step, on this same thread. On a decode worker a step is ~5-10 ms of GPU time, and a reservation
on the time-to-first-token path or an admission on the first-to-second-token path waited for it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineThread:
    def __init__(self, step: Callable[[], bool], name: str = "engine"):
        self._step = step
        self._calls: deque[tuple[Callable[[], Any], Future, bool]] = deque()  # (fn, its future, during_step)
        self._wake = threading.Condition()
        self._stopped = False
        self._poked = False  # wake() since the thread last looked: run step once even if it reported no work
        self.error: BaseException | None = None  # a step that raised: the worker reports itself unhealthy
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], *, during_step: bool = False) -> Future[T]:
        future: Future[T] = Future()
        with self._wake:
            if self._stopped:
                future.set_exception(RuntimeError("engine thread stopped"))
                return future
            self._calls.append((fn, future, during_step))
            self._wake.notify()
        return future

    def run_during_step(self) -> None:
        """Run the queued ``during_step`` calls now; the engine calls this on this thread once a step is launched."""
        with self._wake:
            if not any(during for _, _, during in self._calls):
                return
            now = [call for call in self._calls if call[2]]
            self._calls = deque(call for call in self._calls if not call[2])
        self._run_calls(now)

    @staticmethod
    def _run_calls(calls: list[tuple[Callable[[], Any], Future, bool]]) -> None:
        for fn, future, _ in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as err:  # the caller gets it
                    future.set_exception(err)

    def wake(self) -> None:
        """Tell the thread there may be work for ``step`` (e.g. a request was queued)."""
        with self._wake:
            self._poked = True
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        busy = False
        while True:
            with self._wake:
                while not self._calls and not busy and not self._poked and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    for _, future, _ in self._calls:
                        future.set_exception(RuntimeError("engine thread stopped"))
                    return
                calls = list(self._calls)
                self._calls.clear()
                self._poked = False
            self._run_calls(calls)
            try:
                busy = self._step()
            except Exception as err:
                log.exception("engine step failed")
                self.error = err
                busy = False
