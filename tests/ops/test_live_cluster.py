"""Operations on a real cluster: status, scaling under load without losing a request, and the graceful drain."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from splitserve.cli import main
from splitserve.client import Client, GenerateResult, Unavailable
from splitserve.launcher import drain_and_stop
from tests.support import nobody_listens

pytestmark = pytest.mark.slow
MAX_TOKENS = 12
LONG_TOKENS = 1500
WAIT_S = 60


def _wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class _Load:
    """Clients sending requests back to back until stopped; every result and error is kept."""

    def __init__(self, address: str, clients: int = 3):
        self.address = address
        self.results: list[GenerateResult] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        with Client(self.address, retries=0, timeout=WAIT_S) as client:
            while not self._stop.is_set():
                try:
                    prompt = f"client {index} request {len(self.results)}"
                    self.results.append(client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, stream=False))
                except Exception as err:
                    self.errors.append(err)

    def served_by(self) -> set[str]:
        return {w for r in list(self.results) if r.timing for w in (r.timing.prefill_worker, r.timing.decode_worker)}

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=WAIT_S)


def test_scale_up_and_down_under_load_loses_no_request(live, capsys):
    with _Load(live.grpc_address) as load, Client(live.grpc_address) as admin:
        assert admin.scale("prefill", 2).added == ["prefill-1"]
        assert admin.scale("decode", 2).added == ["decode-1"]
        _wait_for(lambda: {"prefill-1", "decode-1"} <= load.served_by(), "the new workers to serve requests")

        assert main(["status", "--address", live.grpc_address]) == 0
        table = capsys.readouterr().out
        for worker in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
            assert f"\n{worker} " in table, table

        removed = admin.scale("prefill", 1).removed + admin.scale("decode", 1).removed
        assert len(removed) == 2
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 6, "requests after the scale-down")

    assert not load.errors, load.errors[:3]
    assert len(load.results) >= 10
    assert all(len(r.token_ids) == MAX_TOKENS and r.finish_reason == "length" for r in load.results)
    assert all(r.timing is not None and r.timing.retries == 0 for r in load.results)  # drained, never cut off
    assert sorted(w.role for w in live.cluster.workers.values()) == ["decode", "prefill"]
    assert not set(removed) & set(live.cluster.workers)


def test_drain_lets_in_flight_requests_finish_and_rejects_new_ones(live):
    """Stops the module's cluster, so it stays the last test here."""
    with Client(live.grpc_address, retries=0, timeout=WAIT_S) as client:
        stream = client.generate("a long one", max_tokens=LONG_TOKENS, ignore_eos=True)
        tokens = list(next(stream).token_ids)
        drained = asyncio.run_coroutine_threadsafe(drain_and_stop(live.cluster, live.servers, WAIT_S), live.loop)
        _wait_for(lambda: live.cluster.draining, "the drain to start")
        with pytest.raises(Unavailable, match="shutting down"):
            client.generate("too late", max_tokens=4, stream=False)
        assert not drained.done(), "the drain ended before the in-flight request did"
        last = None
        for event in stream:
            tokens += event.token_ids
            last = event
    assert len(tokens) == LONG_TOKENS and last is not None and last.finish_reason == "length"
    drained.result(WAIT_S)
    assert live.cluster.workers == {}
    assert nobody_listens(f"127.0.0.1:{live.servers.grpc_port}")  # the API port is closed
