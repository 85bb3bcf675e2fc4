"""A transfer opened before its destination pages are known: layers kept until then go first and in order, and
one that never gets its pages ends with a typed error, never a hang, telling the receiver nothing."""

from __future__ import annotations

import threading
import time

import pytest

from splitserve.config import KVTransferConfig
from splitserve.kv_transfer import (
    PeerUnavailable,
    TransferAborted,
    TransferTimeout,
    make_receiver,
    make_sender,
)
from splitserve.kv_transfer.deferred import DeferredSend
from tests.kv_transfer.helpers import FakeRunner, pages_equal, send_all

SRC_BLOCKS = [3, 0, 7]
DST_BLOCKS = [9, 2, 14]
SLOW = 30.0  # a timeout no test should reach


@pytest.fixture
def pair():
    src, dst = FakeRunner(layers=4, seed=1), FakeRunner(layers=4, seed=2)
    receivers = []

    def open_(backend: str, timeout_s: float = SLOW):
        cfg = KVTransferConfig(backend=backend, timeout_s=timeout_s)
        receiver = make_receiver(cfg, dst)
        receivers.append(receiver)
        sender = make_sender(cfg, receiver.endpoint)
        return receiver, DeferredSend(lambda blocks: sender.begin(src.spec("r1", blocks)), timeout_s)

    yield src, dst, open_
    for receiver in receivers:
        receiver.close()


@pytest.mark.parametrize("backend", ["local", "grpc", "tcp"])
@pytest.mark.parametrize("kept", [0, 2, 4])
def test_layers_kept_before_the_pages_are_known_arrive_in_order(pair, backend, kept):
    src, dst, open_ = pair
    receiver, handle = open_(backend)
    done = receiver.expect(dst.spec("r1", DST_BLOCKS))
    send_all(handle, src, SRC_BLOCKS, layers=range(kept))
    assert not handle.opened and not done.done()  # nothing reached the receiver yet
    handle.open(DST_BLOCKS)
    send_all(handle, src, SRC_BLOCKS, layers=range(kept, src.num_layers))
    sent = handle.finish()
    assert done.result(timeout=5).bytes == sent > 0
    assert pages_equal(src, SRC_BLOCKS, dst, DST_BLOCKS)


@pytest.mark.parametrize("kept", [0, 2, 4])
def test_blocks_the_receiver_holds_are_not_sent(pair, kept):
    """Pages that say the receiver holds the first block already: every layer, kept or not, goes without it."""
    src, dst, open_ = pair
    receiver, handle = open_("tcp")
    done = receiver.expect(dst.spec("r1", DST_BLOCKS[1:]))
    send_all(handle, src, SRC_BLOCKS, layers=range(kept))
    handle.open(DST_BLOCKS[1:], skip_blocks=1)
    send_all(handle, src, SRC_BLOCKS, layers=range(kept, src.num_layers))
    assert done.result(timeout=5).bytes == handle.finish() > 0
    assert pages_equal(src, SRC_BLOCKS[1:], dst, DST_BLOCKS[1:])


def test_finish_waits_for_the_pages_from_another_thread(pair):
    src, dst, open_ = pair
    receiver, handle = open_("grpc")
    done = receiver.expect(dst.spec("r1", DST_BLOCKS))
    send_all(handle, src, SRC_BLOCKS)  # the whole pass ran before the reservation came back
    opener = threading.Timer(0.2, handle.open, args=(DST_BLOCKS,))
    opener.start()
    assert handle.finish() > 0 and done.result(timeout=5)
    opener.join()
    assert pages_equal(src, SRC_BLOCKS, dst, DST_BLOCKS)


def test_a_reservation_that_failed_ends_it_at_once_and_opens_nothing(pair):
    src, _, open_ = pair
    _, handle = open_("grpc")
    send_all(handle, src, SRC_BLOCKS, layers=[0])
    raised: list[BaseException] = []

    def finish() -> None:
        try:
            handle.finish()
        except BaseException as err:
            raised.append(err)

    waiting = threading.Thread(target=finish)
    t0 = time.monotonic()
    waiting.start()
    time.sleep(0.05)
    handle.fail(PeerUnavailable("decode worker: KV cache full"))
    waiting.join(timeout=5)
    assert time.monotonic() - t0 < 2 and [type(e) for e in raised] == [PeerUnavailable]
    handle.open(DST_BLOCKS)  # an answer after the failure changes nothing
    assert not handle.opened
    with pytest.raises(PeerUnavailable, match="KV cache full"):
        handle.finish()


@pytest.mark.parametrize("backend", ["local", "grpc", "tcp"])
def test_an_abort_before_the_pages_drops_it_and_one_after_reaches_the_receiver(pair, backend):
    src, dst, open_ = pair
    _, unopened = open_(backend)
    unopened.abort("finished at the first token")
    unopened.open(DST_BLOCKS)
    assert not unopened.opened
    with pytest.raises(TransferAborted, match="finished at the first token"):
        unopened.finish()

    receiver, opened = open_(backend)
    done = receiver.expect(dst.spec("r1", DST_BLOCKS))
    send_all(opened, src, SRC_BLOCKS, layers=[0])
    opened.open(DST_BLOCKS)
    opened.abort("aborted by the router")
    with pytest.raises(TransferAborted):
        done.result(timeout=5)
    with pytest.raises(TransferAborted):
        opened.finish()


def test_pages_that_never_come_time_out(pair):
    src, _, open_ = pair
    _, handle = open_("grpc", timeout_s=0.2)
    send_all(handle, src, SRC_BLOCKS, layers=[0])
    with pytest.raises(TransferTimeout):
        handle.finish()
    handle.open(DST_BLOCKS)
    assert not handle.opened


def test_begin_gets_the_destination_pages():
    begun: list[list[int]] = []

    def begin(blocks: list[int]) -> _NullHandle:
        begun.append(blocks)
        return _NullHandle()

    handle = DeferredSend(begin, SLOW)
    handle.open(DST_BLOCKS)
    handle.open([1])  # a second answer is ignored
    assert begun == [DST_BLOCKS] and handle.finish() == 0


class _NullHandle:
    """Fake: a transfer that moves nothing, to see what the deferral hands its begin."""

    def send_layer(self, layer, pages):
        pass

    def finish(self) -> int:
        return 0

    def abort(self, reason: str) -> None:
        pass
