"""Runs an engine on one dedicated thread, so async actor code never blocks on a forward pass.

Every engine call goes through this thread (``submit``), or holds the engine the way it does: the thread holds
``_engine`` while it runs calls and steps, so the engine needs no locks inside. Between calls the thread runs
``step`` while it reports work, and sleeps on a condition variable otherwise, so an idle worker burns no CPU.

A call that touches nothing a step in flight uses (reserving free pages, queueing a request for the next step) may
be submitted ``during_step``: it then runs on a side thread as soon as it can take the engine, which the engine
thread lets go of while it waits for the device (``device_wait``), so it does not wait for the step to end. The
engine thread itself runs the ones still waiting before its next step: a lock is not handed over in turn, and a
thread that lets go of it and takes it again at once would otherwise keep them waiting for as long as it has work
(on a CPU the device wait is over as soon as it begins). So a during-step call never waits for more than the step in
flight. On a decode worker a step is ~5-10 ms of GPU time, and a reservation on the time-to-first-token path, an
admission on the first-to-second-token path or an abort's freeing of reserved pages would otherwise wait for the
step in flight, then for the next step's launch.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineThread:
    def __init__(self, step: Callable[[], bool], name: str = "engine"):
        self._step = step
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        # during-step calls not run yet: by the side thread, or by the engine thread before its next step
        self._beside: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._engine = threading.Lock()  # whoever holds it may use the engine
        self._stopped = False
        self._poked = False  # wake() since the thread last looked: run step once even if it reported no work
        self.error: BaseException | None = None  # a step that raised: the worker reports itself unhealthy
        # One side thread: during-step calls run one at a time, in the order submitted.
        self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-side")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], *, during_step: bool = False) -> Future[T]:
        future: Future[T] = Future()
        with self._wake:
            if self._stopped:
                future.set_exception(RuntimeError("engine thread stopped"))
                return future
            if during_step:
                self._beside.append((fn, future))
                self._side.submit(self._run_beside)
            else:
                self._calls.append((fn, future))
                self._wake.notify()
        return future

    def device_wait(self, wait: Callable[[], None]) -> None:
        """Run the step's blocking ``wait`` for the device with the engine let go, so during-step calls run now."""
        self._engine.release()
        try:
            wait()
        finally:
            self._engine.acquire()

    def _run_beside(self) -> None:
        with self._engine:
            calls = self._take_beside()
            if self._stopped:
                for _, future in calls:
                    future.set_exception(RuntimeError("engine thread stopped"))
                return
            self._run_calls(calls)
        if calls:
            self.wake()  # what they queued for the engine (a request to admit) runs from the next step on

    def _take_beside(self) -> list[tuple[Callable[[], Any], Future]]:
        """The during-step calls waiting, in the order submitted; taken while holding the engine, so each runs once."""
        with self._wake:
            calls = list(self._beside)
            self._beside.clear()
        return calls

    @staticmethod
    def _run_calls(calls: list[tuple[Callable[[], Any], Future]]) -> None:
        for fn, future in calls:
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
        self._side.shutdown(wait=False)  # calls still queued there fail as they come up

    def _run(self) -> None:
        busy = False
        while True:
            with self._wake:
                while not self._calls and not busy and not self._poked and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    for _, future in self._calls:
                        future.set_exception(RuntimeError("engine thread stopped"))
                    return
                self._poked = False
            with self._engine:
                self._run_calls(self._take_beside())
                # Taken after the during-step calls ran: what they submitted for between two steps runs now too.
                with self._wake:
                    calls = list(self._calls)
                    self._calls.clear()
                self._run_calls(calls)
                try:
                    busy = self._step()
                except Exception as err:
                    log.exception("engine step failed")
                    self.error = err
                    busy = False
