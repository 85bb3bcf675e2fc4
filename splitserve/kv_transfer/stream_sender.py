"""The sending side of every remote backend: one client-streaming RPC per transfer, fed from a queue.

``send_layer`` only queues; gRPC's own thread pulls messages from a generator that encodes (or moves out of band)
one layer at a time, so the engine's layer hook never waits for the network and HTTP/2 flow control paces the rest.
What moves a layer is a ``LayerWriter``: inline chunks (grpc), a copy into the peer's memory (cuda_ipc), or an
NCCL send (nccl).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import grpc
import torch

from splitserve.kv_transfer import wire
from splitserve.kv_transfer.base import TransferSpec
from splitserve.kv_transfer.errors import PeerUnavailable, TransferAborted, TransferError, TransferTimeout
from splitserve.kv_transfer.grpc_server import channel_options
from splitserve.kv_transfer.status import error_from_rpc


class LayerWriter:
    """Moves one transfer's layers; a new one per transfer. The defaults suit a writer with nothing to add."""

    transport: str
    interruptible = False  # a layer being sent may be cut short by an abort (inline chunks: yes; nccl: no)

    def begin_fields(self) -> dict:
        """Extra BEGIN header fields (e.g. the codec)."""
        return {}

    def prepare(self, layer: int, pages: torch.Tensor) -> object:
        """Runs in send_layer, on the caller's thread: start device work early (e.g. an async copy to host).
        Returns what ``messages`` needs, or None when the layer needs no message at all."""
        raise NotImplementedError

    def messages(self, layer: int, prepared: object) -> Iterator[bytes]:
        """Runs on gRPC's thread: move the layer, yield the messages that announce or carry it."""
        raise NotImplementedError

    def seal(self) -> None:
        """No more layers come (finish or abort), on the caller's thread: e.g. pad what the peer still awaits."""

    def end_fields(self) -> dict:
        """Runs before END: wait for out-of-band work, return e.g. the checksum."""
        return {}

    def lost(self) -> None:
        """The peer is gone or went silent: e.g. stop reusing state shared with it."""


class _Outbox:
    """The messages (or thunks producing them) waiting for gRPC to pull them; abort drops what is queued."""

    def __init__(self, interruptible: bool = False):
        self._items: deque[Callable[[], Iterator[bytes]]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._interrupt = False
        self._started = False  # gRPC pulled the first item (BEGIN): an abort must never drop it
        self._interruptible = interruptible  # the item being sent may be cut short (inline chunks: yes; nccl: no)
        self.last_progress = time.monotonic()

    def put(self, item: Callable[[], Iterator[bytes]]) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify()
            return True

    def preempt(self, item: Callable[[], Iterator[bytes]]) -> None:
        """Drop everything queued and send ``item`` next, even after ``close()`` (an abort after finish() started:
        the layers still queued must not keep flowing). A no-op once the stream has ended."""
        with self._cond:
            keep = [self._items[0]] if self._items and not self._started else []  # BEGIN: the receiver needs it
            self._items.clear()
            self._items.extend([*keep, item])
            self._interrupt = self._interruptible
            self._closed = True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def stream(self) -> Iterator[bytes]:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                item = self._items.popleft()
                self._started = True
                self._interrupt = False
            for message in item():
                yield message
                self.last_progress = time.monotonic()
                if self._interrupt:  # an abort is waiting: stop this layer mid-way, the receiver discards it
                    break


class StreamHandle:
    def __init__(
        self, call: grpc.StreamUnaryMultiCallable, spec: TransferSpec, writer: LayerWriter, peer: str, timeout_s: float
    ):
        self.spec = spec
        self._writer = writer
        self._peer = peer
        self._timeout_s = timeout_s
        self._aborted: str | None = None
        self._sent = 0
        self._outbox = _Outbox(interruptible=writer.interruptible)
        header = {"kind": wire.BEGIN, "spec": spec.to_wire(), "transport": writer.transport, **writer.begin_fields()}
        self._outbox.put(lambda: iter([wire.pack(header)]))
        self._future = call.future(self._outbox.stream())
        self._future.add_done_callback(lambda _: self._outbox.close())  # a failed call stops the generator

    def send_layer(self, layer: int, pages: torch.Tensor) -> None:
        if tuple(pages.shape) != self.spec.layer_shape:
            raise ValueError(f"layer {layer}: pages {tuple(pages.shape)}, expected {self.spec.layer_shape}")
        prepared = self._writer.prepare(layer, pages)
        if prepared is not None:  # None: the layer went out of band with nothing to announce (no wake-up of gRPC)
            self._outbox.put(lambda: self._writer.messages(layer, prepared))

    def finish(self) -> int:
        if self._aborted is None:
            self._writer.seal()
            self._outbox.put(lambda: iter([wire.pack({"kind": wire.END, **self._writer.end_fields()})]))
            self._outbox.close()
        reply = self._wait()
        if self._aborted is not None:
            raise TransferAborted(f"{self.spec.request_id}: aborted by the sender ({self._aborted})")
        return int(reply["bytes"])

    def abort(self, reason: str) -> None:
        if self._aborted is not None:
            return
        self._aborted = reason
        self._writer.seal()
        # Even when finish() already closed the outbox: the queued layers are dropped and the abort goes next, so
        # the receiver fails the transfer now instead of after every remaining layer has crossed the wire.
        self._outbox.preempt(lambda: iter([wire.pack({"kind": wire.ABORT, "reason": reason})]))
        try:
            self._wait()
        except TransferError:
            pass  # the receiver is gone or gave up already: either way nothing is written any more

    def _wait(self) -> dict:
        try:
            return self._reply()
        except (PeerUnavailable, TransferTimeout):
            self._writer.lost()
            raise

    def _reply(self) -> dict:
        """The reply; TransferTimeout only when gRPC pulled nothing for timeout_s and no reply came."""
        while True:
            try:
                return wire.unpack(self._future.result(timeout=0.2)).header
            except grpc.FutureTimeoutError:
                if time.monotonic() - self._outbox.last_progress > self._timeout_s:
                    self._future.cancel()
                    raise TransferTimeout(f"{self._peer}: no progress for {self._timeout_s:g} s") from None
            except grpc.FutureCancelledError:
                raise PeerUnavailable(f"{self._peer}: transfer cancelled") from None
            except grpc.RpcError as err:
                raise error_from_rpc(err, self._peer) from None


class StreamSender:
    """Opens one RPC per transfer on a shared channel to one receiver."""

    def __init__(
        self,
        address: str,
        writer_factory: Callable[[TransferSpec], LayerWriter],
        *,
        max_message: int,
        timeout_s: float,
        backend: str,
    ):
        self.address = address
        self.backend = backend
        self._writer_factory = writer_factory
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message))
        self._call = self._channel.stream_unary(
            wire.METHOD, request_serializer=wire.identity, response_deserializer=wire.identity
        )

    def begin(self, spec: TransferSpec) -> StreamHandle:
        return StreamHandle(self._call, spec, self._writer_factory(spec), self.address, self._timeout_s)

    def close(self) -> None:
        self._channel.close()
