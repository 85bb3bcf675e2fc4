"""Failures end transfers with typed errors on both sides, by protocol message, well before the timeout."""

from __future__ import annotations

import time

import pytest

from splitserve.config import KVTransferConfig
from splitserve.kv_transfer import (
    PeerUnavailable,
    TransferAborted,
    TransferError,
    TransferTimeout,
    make_receiver,
    make_sender,
)
from tests.kv_transfer.helpers import FakeRunner, send_all

BLOCKS = [5, 1, 8]
SLOW = 30.0  # a timeout no test should ever reach


class Pair:
    """A source and a destination runner, and the receivers and senders opened between them."""

    def __init__(self):
        self.src, self.dst = FakeRunner(layers=4), FakeRunner(layers=4, seed=9)
        self.receivers = []

    def open(self, backend="grpc", timeout_s=SLOW):
        cfg = KVTransferConfig(backend=backend, timeout_s=timeout_s)
        receiver = make_receiver(cfg, self.dst)
        self.receivers.append(receiver)
        return receiver, make_sender(cfg, receiver.endpoint)

    def start(self, backend, request_id, layers, timeout_s=SLOW):
        """A transfer of ``request_id`` the receiver expects and the sender has begun, with ``layers`` sent:
        the receiver, its expectation's future and the sender's handle."""
        receiver, sender = self.open(backend, timeout_s)
        done = receiver.expect(self.dst.spec(request_id, BLOCKS))
        handle = sender.begin(self.src.spec(request_id, BLOCKS))
        send_all(handle, self.src, BLOCKS, layers=layers)
        return receiver, done, handle


@pytest.fixture
def pair():
    opened = Pair()
    yield opened
    for r in opened.receivers:
        r.close()


@pytest.mark.parametrize("backend", ["local", "grpc", "tcp"])
def test_sender_abort_frees_the_expectation(pair, backend):
    _, done, handle = pair.start(backend, "a", layers=[0, 1])
    t0 = time.monotonic()
    handle.abort("prefill failed")
    with pytest.raises(TransferAborted, match="prefill failed"):
        done.result(timeout=5)
    assert time.monotonic() - t0 < 2
    with pytest.raises(TransferAborted):
        handle.finish()


@pytest.mark.parametrize("backend", ["local", "grpc", "tcp"])
def test_receiver_abort_reaches_the_sender(pair, backend):
    receiver, done, handle = pair.start(backend, "b", layers=[0])
    time.sleep(0.1)
    before = pair.dst.kv_cache.clone()
    assert receiver.abort("b", "client went away")
    t0 = time.monotonic()
    send_all(handle, pair.src, BLOCKS, layers=[1, 2, 3])  # later data is discarded, never raises here
    with pytest.raises(TransferAborted):
        handle.finish()
    assert time.monotonic() - t0 < 2
    with pytest.raises(TransferAborted):
        done.result(timeout=1)
    assert pair.dst.kv_cache.equal(before)  # nothing written after abort()


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_abort_before_the_sender_starts(pair, backend):
    receiver, sender = pair.open(backend)
    receiver.expect(pair.dst.spec("c", BLOCKS))
    receiver.abort("c")
    handle = sender.begin(pair.src.spec("c", BLOCKS))
    send_all(handle, pair.src, BLOCKS)
    with pytest.raises(TransferAborted):
        handle.finish()


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_unknown_transfer_is_refused(pair, backend):
    _, sender = pair.open(backend)
    handle = sender.begin(pair.src.spec("nobody-expects-me", BLOCKS))
    send_all(handle, pair.src, BLOCKS)
    with pytest.raises(TransferError, match="no transfer expected"):
        handle.finish()


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_receiver_killed_mid_transfer(pair, backend):
    receiver, _, handle = pair.start(backend, "d", layers=[0])
    time.sleep(0.1)
    t0 = time.monotonic()
    receiver.close()
    send_all(handle, pair.src, BLOCKS, layers=[1, 2, 3])
    with pytest.raises(PeerUnavailable):
        handle.finish()
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_no_receiver_at_all(backend):
    src = FakeRunner()
    receiver = make_receiver(KVTransferConfig(backend=backend), FakeRunner())
    endpoint = receiver.endpoint
    receiver.close()
    handle = make_sender(KVTransferConfig(backend=backend), endpoint).begin(src.spec("e", BLOCKS))
    send_all(handle, src, BLOCKS)
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailable):
        handle.finish()
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_silent_sender_times_out(pair, backend):
    _, done, handle = pair.start(backend, "f", layers=[0], timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        done.result(timeout=5)
    assert 0.4 < time.monotonic() - t0 < 2
    with pytest.raises(TransferTimeout):
        handle.finish()
