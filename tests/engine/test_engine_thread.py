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
