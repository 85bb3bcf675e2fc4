"""The receiver's hooks for backends that move bytes outside gRPC (nccl and cuda_ipc are the real ones; they need
GPUs).

What keeps them safe is protocol, so it is tested here on CPU with fake out-of-band transports. NCCL-like (drains):
``open`` runs at BEGIN even for a transfer the receiver refuses, ``close`` runs at END with the END header, and a
receiver abort is answered at END rather than by cutting the stream. cuda_ipc-like (writes the receiver's pages
itself): nothing is written before READY, and after a receiver abort the pages stay out of reuse
(``unwritten``) until the sender has stopped writing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from splitserve.kv_transfer import TransferAborted, wire
from splitserve.kv_transfer.expectations import Expectation
from splitserve.kv_transfer.grpc_server import AbortMode, OutOfBand
from splitserve.kv_transfer.receiver import KVReceiver
from splitserve.kv_transfer.stream_sender import LayerWriter, StreamSender
from tests.kv_transfer.helpers import FakeRunner

BLOCKS = [5, 1, 8]


class FakeOutOfBand(OutOfBand):
    """Stands in for NCCL: the sender's layers travel through a dict, and every hook call is recorded."""

    on_receiver_abort = AbortMode.DRAIN

    def __init__(self) -> None:
        self.wire: dict[str, list[torch.Tensor]] = {}
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.claimed = threading.Event()  # a sender saw READY: the transfer was claimed

    def open(self, spec, begin):
        with self.lock:
            self.calls.append(("open", spec.request_id))
        return spec.request_id

    def close(self, exp: Expectation, opened: object, end: dict) -> None:
        with self.lock:
            self.calls.append(("close", str(opened)))
        layers = self.wire.get(str(opened), [])[: end["layers"]]
        if layers:
            exp.land_layers(0, torch.stack(layers), exp.spec.layer_bytes)


class FakeWriter(LayerWriter):
    """Puts layers on the fake wire; nothing per layer on the gRPC stream, as nccl does."""

    transport = "fake"

    def __init__(self, fake: FakeOutOfBand, request_id: str):
        self._fake = fake
        self._layers = fake.wire.setdefault(request_id, [])

    def prepare(self, layer: int, pages: torch.Tensor) -> None:
        self._layers.append(pages.clone())

    def ready(self) -> None:
        self._fake.claimed.set()

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
        lambda spec: FakeWriter(fake, spec.request_id),
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


class FakeDirectInbox(OutOfBand):
    """Stands in for cuda_ipc's receiver: the sender writes the pages itself; END names the layers it wrote."""

    on_receiver_abort = AbortMode.STOP

    def close(self, exp: Expectation, opened: object, end: dict) -> None:
        for layer in end["layers"]:
            exp.mark_written(layer, exp.spec.layer_bytes)


class FakeDirectWriter(LayerWriter):
    """Stands in for cuda_ipc's sender: a copy is issued at send_layer once READY came, and lands only at ``drain``
    (as an async device copy lands at the stream's sync); each landing is timestamped."""

    transport = "direct"

    def __init__(self, dst: FakeRunner, blocks: list[int]):
        self._dst, self._blocks = dst, blocks
        self.go = threading.Event()
        self.halted = False
        self.issued: list[tuple[int, torch.Tensor]] = []
        self.landed_at: list[float] = []
        self.written: list[int] = []

    def prepare(self, layer: int, pages: torch.Tensor) -> torch.Tensor | None:
        if not self.go.is_set():
            return pages.clone()  # gRPC's thread issues it once READY comes
        self._issue(layer, pages)
        return None

    def messages(self, layer: int, prepared: object) -> Iterator[wire.Outgoing]:
        assert isinstance(prepared, torch.Tensor)
        self.go.wait()
        self._issue(layer, prepared)
        yield from ()

    def _issue(self, layer: int, pages: torch.Tensor) -> None:
        if not self.halted:
            self.issued.append((layer, pages.clone()))

    def ready(self) -> None:
        self.go.set()

    def halt(self) -> None:
        self.halted = True
        self.go.set()

    def drain(self) -> None:
        time.sleep(0.2)  # a slow copy still in flight when the receiver aborts
        for layer, pages in self.issued:
            self._dst.scatter_layers(layer, self._blocks, pages.unsqueeze(0))
            self.landed_at.append(time.monotonic())
            self.written.append(layer)
        self.issued.clear()

    def end_fields(self) -> dict:
        return {"layers": self.written}


@pytest.fixture
def direct():
    dst = FakeRunner(layers=3, seed=2)
    receiver = KVReceiver(
        dst, backends=("direct",), device=torch.device("cpu"), out_of_band={"direct": FakeDirectInbox()}
    )
    assert receiver.address is not None
    writers: dict[str, FakeDirectWriter] = {}

    def writer(spec):
        writers[spec.request_id] = FakeDirectWriter(dst, spec.dst_block_ids)
        return writers[spec.request_id]

    sender = StreamSender(receiver.address, writer, max_message=1 << 20, timeout_s=30, backend="direct")
    yield receiver, sender, writers, dst
    sender.close()
    receiver.close()


def test_a_direct_writer_lands_everything_it_names(direct):
    receiver, sender, _writers, dst = direct
    src = FakeRunner(layers=3, seed=1)
    done = receiver.expect(dst.spec("ok", BLOCKS))
    handle = sender.begin(src.spec("ok", BLOCKS))
    for layer in range(3):
        handle.send_layer(layer, src.gather_pages(layer, [0, 2, 4]))
    assert handle.finish() == 3 * src.spec("ok", BLOCKS).layer_bytes
    done.result(timeout=5)
    assert receiver.unwritten("ok").done()
    assert all(torch.equal(src.gather_pages(i, [0, 2, 4]), dst.gather_pages(i, BLOCKS)) for i in range(3))


def test_a_direct_writer_writes_nothing_into_pages_refused_before_it_began(direct):
    """Aborted before the sender began: the pages may already be another request's, so no READY, no write."""
    receiver, sender, writers, dst = direct
    receiver.expect(dst.spec("gone", BLOCKS))
    receiver.abort("gone", "client went away")
    before = dst.kv_cache.clone()
    src = FakeRunner(layers=3, seed=1)
    handle = sender.begin(src.spec("gone", BLOCKS))
    for layer in range(3):
        handle.send_layer(layer, src.gather_pages(layer, [0, 2, 4]))
    with pytest.raises(TransferAborted):
        handle.finish()
    assert writers["gone"].written == []
    assert torch.equal(dst.kv_cache, before)


def test_a_receiver_abort_holds_the_pages_until_the_direct_writer_stopped(direct):
    receiver, sender, writers, dst = direct
    src = FakeRunner(layers=3, seed=1)
    done = receiver.expect(dst.spec("mid", BLOCKS))
    handle = sender.begin(src.spec("mid", BLOCKS))
    assert _wait_for(lambda: writers["mid"].go.is_set())
    handle.send_layer(0, src.gather_pages(0, [0, 2, 4]))  # issued; lands only when the writer drains
    assert receiver.abort("mid", "decode side gave up")
    with pytest.raises(TransferAborted):
        done.result(timeout=5)
    unwritten = receiver.unwritten("mid")
    assert not unwritten.done()  # the copy in flight may still land: the pages are not free yet
    unwritten.result(timeout=5)
    freed_at = time.monotonic()
    writer = writers["mid"]
    assert writer.written == [0] and writer.landed_at[-1] <= freed_at  # every write landed before the release
    handle.send_layer(1, src.gather_pages(1, [0, 2, 4]))  # the prefill side goes on: nothing more is written
    with pytest.raises(TransferAborted):
        handle.finish()
    assert writer.written == [0]
    assert torch.equal(dst.gather_pages(1, BLOCKS), FakeRunner(layers=3, seed=2).gather_pages(1, BLOCKS))


def _wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
