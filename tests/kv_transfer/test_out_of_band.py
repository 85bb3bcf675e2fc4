"""The receiver's hooks for backends that move bytes outside gRPC (nccl is the real one; it needs two GPUs).

What keeps an NCCL pair in step is protocol, so it is tested here on CPU with a fake out-of-band transport: ``open``
runs at BEGIN even for a transfer the receiver refuses, ``close`` runs at END with the END header, and a transport
that drains answers a receiver abort at END rather than cutting the stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from splitserve.kv_transfer import TransferAborted, wire
from splitserve.kv_transfer.expectations import Expectation
from splitserve.kv_transfer.grpc_server import OutOfBand
from splitserve.kv_transfer.receiver import KVReceiver
from splitserve.kv_transfer.stream_sender import LayerWriter, StreamSender
from tests.kv_transfer.helpers import FakeRunner

BLOCKS = [5, 1, 8]


class FakeOutOfBand(OutOfBand):
    """Stands in for NCCL: the sender's layers travel through a dict, and every hook call is recorded."""

    drains = True

    def __init__(self) -> None:
        self.wire: dict[str, list[torch.Tensor]] = {}
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.claimed = threading.Event()  # a LAYER marker arrived: the transfer was claimed before it

    def open(self, spec, begin):
        with self.lock:
            self.calls.append(("open", spec.request_id))
        return spec.request_id

    def land(self, exp: Expectation, header: dict, begin: dict) -> None:
        self.claimed.set()

    def close(self, exp: Expectation, opened: object, end: dict) -> None:
        with self.lock:
            self.calls.append(("close", str(opened)))
        layers = self.wire.get(str(opened), [])[: end["layers"]]
        exp.land_layers(enumerate(layers), exp.spec.layer_bytes)


class FakeWriter(LayerWriter):
    """Puts layers on the fake wire; nothing per layer on the gRPC stream, as nccl does."""

    transport = "fake"

    def __init__(self, wire: dict[str, list[torch.Tensor]], request_id: str):
        self._layers = wire.setdefault(request_id, [])

    def prepare(self, layer: int, pages: torch.Tensor) -> int | None:
        self._layers.append(pages.clone())
        return layer if layer == 0 else None  # one marker, so a test can tell the transfer was claimed

    def messages(self, layer: int, prepared: object) -> Iterator[bytes]:
        yield wire.pack({"kind": wire.LAYER, "layer": layer})

    def end_fields(self) -> dict:
        return {"layers": len(self._layers)}


@pytest.fixture
def link():
    dst = FakeRunner(layers=3, seed=2)
    fake = FakeOutOfBand()
    receiver = KVReceiver(dst, backends=("fake",), device=torch.device("cpu"), out_of_band={"fake": fake})
    assert receiver.address is not None
    sender = StreamSender(
        receiver.address,
        lambda spec: FakeWriter(fake.wire, spec.request_id),
        max_message=1 << 20,
        timeout_s=30,
        backend="fake",
    )
    yield receiver, sender, fake, dst
    sender.close()
    receiver.close()


def _send(sender, src, request_id, layers):
    handle = sender.begin(src.spec(request_id, BLOCKS))
    for layer in layers:
        handle.send_layer(layer, src.gather_pages(layer, [0, 2, 4]))
    return handle


def test_layers_land_at_end_through_close(link):
    receiver, sender, fake, dst = link
    src = FakeRunner(layers=3, seed=1)
    done = receiver.expect(dst.spec("ok", BLOCKS))
    assert _send(sender, src, "ok", range(3)).finish() > 0
    done.result(timeout=5)
    assert fake.calls == [("open", "ok"), ("close", "ok")]
    assert all(torch.equal(src.gather_pages(i, [0, 2, 4]), dst.gather_pages(i, BLOCKS)) for i in range(3))


def test_open_runs_for_a_refused_transfer(link):
    """The receiver aborted before the sender began: NCCL's receives must still be posted to match its sends."""
    receiver, sender, fake, dst = link
    receiver.expect(dst.spec("gone", BLOCKS))
    receiver.abort("gone", "client went away")
    src = FakeRunner(layers=3, seed=1)
    with pytest.raises(TransferAborted):
        _send(sender, src, "gone", range(3)).finish()
    assert ("open", "gone") in fake.calls


def test_a_draining_transport_answers_a_receiver_abort_at_end(link):
    receiver, sender, fake, dst = link
    src = FakeRunner(layers=3, seed=1)
    untouched = dst.gather_pages(0, BLOCKS).clone()
    done = receiver.expect(dst.spec("mid", BLOCKS))
    handle = _send(sender, src, "mid", [0])
    assert fake.claimed.wait(5)  # abort a transfer under way, not one that has not begun (that is the test above)
    receiver.abort("mid", "decode side gave up")
    with pytest.raises(TransferAborted):
        done.result(timeout=5)
    for layer in (1, 2):
        handle.send_layer(layer, src.gather_pages(layer, [0, 2, 4]))
    with pytest.raises(TransferAborted):
        handle.finish()
    assert ("close", "mid") in fake.calls  # the stream ran to END: the transport could drain what it announced
    assert torch.equal(dst.gather_pages(0, BLOCKS), untouched)  # and nothing landed after the abort


def test_a_short_transfer_names_the_missing_layers(link):
    receiver, sender, _fake, dst = link
    src = FakeRunner(layers=3, seed=1)
    done = receiver.expect(dst.spec("short", BLOCKS))
    with pytest.raises(Exception, match="without layers"):
        _send(sender, src, "short", range(2)).finish()
    with pytest.raises(Exception, match=r"without layers \[2\]"):
        done.result(timeout=5)
