"""The engine thread runs ``step`` after each batch of submitted calls, and after a ``wake`` with none."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from splitserve.engine.engine_thread import EngineThread


def test_wake_alone_runs_step_once_on_an_idle_thread():
    stepped = threading.Event()
    steps = []

    def step() -> bool:
        steps.append(1)
        stepped.set()
        return False  # no more work: the thread goes idle

    thread = EngineThread(step, name="test-engine")
    try:
        assert thread.submit(lambda: 42).result(timeout=5) == 42
        assert stepped.wait(5)  # a step follows the call
        stepped.clear()
        before = len(steps)
        thread.wake()  # nothing submitted: only the wake can start this step
        assert stepped.wait(5), "wake() did not run step on an idle thread"
        assert len(steps) == before + 1
    finally:
        thread.stop()


def test_during_step_calls_run_while_the_step_waits_for_the_device_and_the_others_after_it():
    """While a step waits for the device (``device_wait``) a during_step call runs at once, before the device is done;
    an ordinary call waits for the step's end."""
    inside = threading.Event()  # the step is past its launch, waiting for the device
    release = threading.Event()  # the device is done
    order: list[str] = []
    thread: EngineThread

    def step() -> bool:
        if not order:  # the first step only: launch, let the calls be queued, then wait for the device
            order.append("launched")
            inside.set()
            thread.device_wait(lambda: release.wait(5))
            order.append("step done")
        return False

    thread = EngineThread(step, name="test-engine")
    try:
        thread.wake()
        assert inside.wait(5)
        plain = thread.submit(lambda: order.append("plain"))
        during = thread.submit(lambda: order.append("during"), during_step=True)
        during.result(timeout=5)  # ran with the device still busy
        assert not release.is_set() and not plain.done()
        release.set()
        plain.result(timeout=5)
        assert order == ["launched", "during", "step done", "plain"]
    finally:
        thread.stop()


def test_a_during_step_call_waits_for_host_work_and_wakes_an_idle_thread():
    """Outside the device wait the engine is held: a during_step call waits for the step's host work, and what it
    queues is stepped on afterwards even if the thread was idle."""
    hosting = threading.Event()
    let_go = threading.Event()
    stepped_again = threading.Event()
    steps: list[str] = []

    def step() -> bool:
        if not steps:
            steps.append("host work")
            hosting.set()
            assert let_go.wait(5)
        else:
            steps.append("stepped after the call")
            stepped_again.set()
        return False

    thread = EngineThread(step, name="test-engine")
    try:
        thread.wake()
        assert hosting.wait(5)
        during = thread.submit(lambda: steps.append("call"), during_step=True)
        assert not during.done()  # the engine is held by host work
        let_go.set()
        during.result(timeout=5)
        assert stepped_again.wait(5)
        assert steps == ["host work", "call", "stepped after the call"]
    finally:
        thread.stop()


class BusyEngine:
    """An engine thread busy for many steps that never waits for the device (a CPU engine), held in its first step
    until ``go_on`` is set: it lets go of the engine only between steps, and takes it straight back."""

    def __init__(self) -> None:
        self.steps = 0
        self.go_on = threading.Event()
        self._in_step = threading.Event()
        self.thread = EngineThread(self._step, name="test-engine")
        self.thread.wake()
        assert self._in_step.wait(5)

    def _step(self) -> bool:
        self.steps += 1
        if self.steps == 1:
            self._in_step.set()
            assert self.go_on.wait(5)
        return self.steps < 200


def test_a_during_step_call_waits_for_no_more_than_the_step_in_flight():
    """The call must run before the next step, not whenever the side thread happens to win the lock."""
    busy = BusyEngine()
    try:
        during = busy.thread.submit(lambda: busy.steps, during_step=True)
        busy.go_on.set()
        assert during.result(timeout=5) == 1  # ran after the step in flight, before the next one
    finally:
        busy.thread.stop()


def test_a_call_that_a_during_step_call_submits_runs_before_the_next_step():
    """A decode worker's abort frees a reservation during the step, and hands a request in the batch on to the next
    gap between steps: that must be the gap after the step in flight, not the one after the next step."""
    busy = BusyEngine()
    handed_on: list[Future] = []
    try:
        thread = busy.thread
        during = thread.submit(lambda: handed_on.append(thread.submit(lambda: busy.steps)), during_step=True)
        busy.go_on.set()
        during.result(timeout=5)
        assert handed_on[0].result(timeout=5) == 1  # between the first step and the second
    finally:
        busy.thread.stop()


def test_calls_after_stop_fail_instead_of_hanging():
    thread = EngineThread(lambda: False, name="test-engine")
    thread.stop()
    for during_step in (False, True):
        future = thread.submit(lambda: 1, during_step=during_step)
        with pytest.raises(RuntimeError, match="stopped"):
            future.result(timeout=5)
