"""A sender runs all its transfers to one receiver on one long-lived call (a session): transfers interleave on it,
one transfer's failure stays its own, and a session that fails is replaced for the transfers after it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from splitserve.config import KVTransferConfig
from splitserve.kv_transfer import TransferError, TransferTimeout, make_receiver, make_sender, wire
from splitserve.kv_transfer.expectations import Expectation
from splitserve.kv_transfer.grpc_server import AbortMode, OutOfBand, TransferServer
from splitserve.kv_transfer.receiver import KVReceiver
from splitserve.kv_transfer.stream_sender import LayerWriter, StreamSender
from tests.kv_transfer.helpers import FakeRunner, pages_equal, send_all


@pytest.fixture
def session_count(monkeypatch):
    """How many session calls the receivers' servers have taken (counted inside the real handler)."""
    calls = []
    real = TransferServer._session

    async def counted(self, requests, context):
        calls.append(1)
        await real(self, requests, context)

    monkeypatch.setattr(TransferServer, "_session", counted)
    return calls


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_many_transfers_run_on_one_session(backend, session_count):
    src, dst = FakeRunner(blocks=32, seed=1), FakeRunner(blocks=32, seed=2)
    cfg = KVTransferConfig(backend=backend)
    receiver = make_receiver(cfg, dst)
    sender = make_sender(cfg, receiver.endpoint)
    try:
        for i in range(5):
            blocks = [i, 10 + i, 20 + i]
            done = receiver.expect(dst.spec(f"r{i}", blocks))
            handle = sender.begin(src.spec(f"r{i}", blocks))
            send_all(handle, src, blocks)
            handle.finish()
            done.result(timeout=5)
            assert pages_equal(src, blocks, dst, blocks)
    finally:
        sender.close()
        receiver.close()
    assert len(session_count) == 1


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_interleaved_transfers_each_land_exact(backend):
    src, dst = FakeRunner(blocks=32, seed=3), FakeRunner(blocks=32, seed=4)
    cfg = KVTransferConfig(backend=backend, checksum=True)
    receiver = make_receiver(cfg, dst)
    sender = make_sender(cfg, receiver.endpoint)
    blocks = {"a": [1, 7, 3], "b": [20, 21], "c": [30, 9, 12, 15]}
    try:
        done = {rid: receiver.expect(dst.spec(rid, b)) for rid, b in blocks.items()}
        handles = {rid: sender.begin(src.spec(rid, b)) for rid, b in blocks.items()}
        for layer in range(src.num_layers):  # a batch's prompts: each layer of every transfer in turn
            for rid, handle in handles.items():
                handle.send_layer(layer, src.gather_pages(layer, blocks[rid]))
        for rid in ("c", "a", "b"):
            handles[rid].finish()
            done[rid].result(timeout=5)
    finally:
        sender.close()
        receiver.close()
    assert all(pages_equal(src, b, dst, b) for b in blocks.values())


@pytest.mark.parametrize("backend", ["grpc", "tcp"])
def test_a_refused_transfer_leaves_the_others_on_its_session(backend, session_count):
    src, dst = FakeRunner(seed=5), FakeRunner(seed=6)
    cfg = KVTransferConfig(backend=backend)
    receiver = make_receiver(cfg, dst)
    sender = make_sender(cfg, receiver.endpoint)
    try:
        done = receiver.expect(dst.spec("kept", [2, 4]))
        kept = sender.begin(src.spec("kept", [2, 4]))
        send_all(kept, src, [2, 4], layers=[0])
        refused = sender.begin(src.spec("nobody-expects-me", [5]))
        send_all(refused, src, [5])
        with pytest.raises(TransferError, match="no transfer expected"):
            refused.finish()
        send_all(kept, src, [2, 4], layers=range(1, src.num_layers))
        kept.finish()
        done.result(timeout=5)
    finally:
        sender.close()
        receiver.close()
    assert pages_equal(src, [2, 4], dst, [2, 4])
    assert len(session_count) == 1


class StallingInbox(OutOfBand):
    """A fake out-of-band transport whose END never finishes for the first transfer (a wedged receiver); later
    transfers land zeros."""

    on_receiver_abort = AbortMode.CUT

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closes = 0

    def close(self, exp: Expectation, opened: object, end: dict) -> None:
        self.closes += 1
        if self.closes == 1:
            self.release.wait(30)
        spec = exp.spec
        exp.land_layers(0, torch.zeros(spec.num_layers, *spec.layer_shape, dtype=spec.torch_dtype), spec.layer_bytes)


class SilentWriter(LayerWriter):
    """Moves nothing: the transfers of this test are about the control path only."""

    transport = "stall"

    def prepare(self, layer: int, pages: torch.Tensor) -> None:
        return None

    def end_fields(self) -> dict:
        return {}


def test_a_wedged_session_is_replaced_for_the_next_transfer(session_count):
    dst = FakeRunner(seed=7)
    inbox = StallingInbox()
    receiver = KVReceiver(dst, backends=("stall",), device=torch.device("cpu"), out_of_band={"stall": inbox})
    assert receiver.address is not None
    sender = StreamSender(
        receiver.address, lambda spec: SilentWriter(), max_message=1 << 20, timeout_s=0.5, backend="x"
    )
    try:
        receiver.expect(dst.spec("wedged", [1]))
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            sender.begin(dst.spec("wedged", [1])).finish()
        assert time.monotonic() - t0 < 3
        done = receiver.expect(dst.spec("next", [2]))
        assert sender.begin(dst.spec("next", [2])).finish() == dst.spec("next", [2]).layer_bytes * dst.num_layers
        done.result(timeout=5)
    finally:
        inbox.release.set()
        sender.close()
        receiver.close()
    assert len(session_count) == 2


class _HeldCall:
    """Fake: stands in for the session's gRPC call so the test pulls the session's messages itself, in order."""

    def __init__(self, requests):
        self.requests = requests
        self._over = threading.Event()

    def __iter__(self):
        self._over.wait()
        return iter(())

    def cancel(self) -> None:
        self._over.set()


class _OneMessagePerLayer(LayerWriter):
    transport = "test"

    def prepare(self, layer, pages):
        return layer

    def messages(self, layer, prepared):
        yield {"kind": wire.CHUNK, "layer": prepared}, b""


def test_an_abort_goes_before_the_layers_other_transfers_queued():
    """The receiver frees an aborted transfer's pages when it reads the abort: on a busy session that must not
    wait for every layer other transfers have queued."""
    src = FakeRunner(blocks=8)
    calls: list[_HeldCall] = []
    sender = StreamSender(
        "127.0.0.1:1", lambda spec: _OneMessagePerLayer(), max_message=1 << 20, timeout_s=1, backend="test"
    )
    sender._method = lambda requests: calls.append(_HeldCall(requests)) or calls[-1]  # type: ignore[assignment]
    busy, doomed = sender.begin(src.spec("busy", [0, 1])), sender.begin(src.spec("doomed", [2, 3]))
    try:
        for handle, blocks in ((busy, [0, 1]), (doomed, [2, 3])):
            for layer in range(src.num_layers):
                handle.send_layer(layer, src.gather_pages(layer, blocks))
        messages = calls[0].requests
        begins = [wire.unpack(next(messages)) for _ in range(2)]  # both transfers began; all their layers wait
        assert [(m.kind, m.header["spec"]["request_id"]) for m in begins] == [
            (wire.BEGIN, "busy"),
            (wire.BEGIN, "doomed"),
        ]
        aborting = threading.Thread(target=doomed.abort, args=("the client went away",), daemon=True)
        aborting.start()
        deadline = time.monotonic() + 5
        while len(doomed._outbox._items) != 1 and time.monotonic() < deadline:  # its layers dropped, the abort in
            time.sleep(0.01)
        after = wire.unpack(next(messages))
        assert (after.kind, after.header["t"]) == (wire.ABORT, begins[1].header["t"])
        aborting.join(timeout=10)  # no answer comes: it gives up once the session has been silent for timeout_s
    finally:
        sender.close()
        for call in calls:
            call.cancel()
