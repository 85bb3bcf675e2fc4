"""The engine thread runs ``step`` after each batch of submitted calls, and after a ``wake`` with none."""

from __future__ import annotations

import threading

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


def test_during_step_calls_run_inside_the_step_and_the_others_after_it():
    """A step that reaches its device wait runs the queued during_step calls there; ordinary calls wait for its end."""
    inside = threading.Event()  # the step is past its launch, waiting for the device
    release = threading.Event()  # the device is done
    order: list[str] = []
    thread: EngineThread

    def step() -> bool:
        if not order:  # the first step only: launch, let the calls be queued, then wait for the device
            order.append("launched")
            inside.set()
            assert release.wait(5)
            thread.run_during_step()
            order.append("step done")
        return False

    thread = EngineThread(step, name="test-engine")
    try:
        thread.wake()
        assert inside.wait(5)
        plain = thread.submit(lambda: order.append("plain"))
        during = thread.submit(lambda: order.append("during"), during_step=True)
        release.set()
        plain.result(timeout=5)
        during.result(timeout=5)
        assert order == ["launched", "during", "step done", "plain"]
    finally:
        thread.stop()
