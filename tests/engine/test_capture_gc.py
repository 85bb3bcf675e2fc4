"""The garbage collector is paused across a CUDA graph capture and comes back as it was, even when the capture
fails (cuda_graphs._collector_paused)."""

from __future__ import annotations

import gc

import pytest

from splitserve.engine.cuda_graphs import _collector_paused


def test_no_collection_inside_and_the_collector_back_after_even_on_error():
    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _collector_paused():
        raise RuntimeError("capture invalidated")
    assert gc.isenabled()


def test_a_collector_switched_off_by_the_caller_stays_off():
    gc.disable()
    try:
        with _collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
