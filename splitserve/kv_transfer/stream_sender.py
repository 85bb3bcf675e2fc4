"""The sending side of every remote backend: one bidirectional RPC per transfer, fed from a queue.

``send_layer`` only queues; gRPC's own thread pulls messages from a generator that encodes (or moves out of band)
one layer at a time, so the engine's layer hook never waits for the network and HTTP/2 flow control paces the rest.
A reader thread takes the receiver's answers (READY, STOP, the result) as they come. What moves a layer is a
``LayerWriter``: inline chunks (grpc), a copy into the peer's memory (cuda_ipc), or an NCCL send (nccl).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import torch

from splitserve import handoff_trace
from splitserve.kv_transfer import wire
from splitserve.kv_transfer.base import TransferSpec
from splitserve.kv_transfer.errors import (
    IntegrityError,
    PeerUnavailable,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from splitserve.kv_transfer.grpc_server import channel_options
from splitserve.kv_transfer.status import error_from_rpc

log = logging.getLogger(__name__)


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

    def ready(self) -> None:
        """The receiver claimed its pages (READY), on the reader thread: a writer that writes them itself may."""

    def halt(self) -> None:
        """Write nothing more (the receiver said STOP, or the call is over), on the reader thread."""

    def drain(self) -> None:
        """Before END or ABORT, on gRPC's thread: wait until nothing this writer issued can still write."""

    def end_fields(self) -> dict:
        """The END header's own fields, after ``drain``: e.g. the checksum, or the layers moved."""
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
        self,
        call: grpc.StreamStreamMultiCallable,
        spec: TransferSpec,
        writer: LayerWriter,
        peer: str,
        timeout_s: float,
    ):
        self.spec = spec
        self._writer = writer
        self._peer = peer
        self._timeout_s = timeout_s
        self._aborted: str | None = None
        self._outbox = _Outbox(interruptible=writer.interruptible)
        header = {"kind": wire.BEGIN, "spec": spec.to_wire(), "transport": writer.transport, **writer.begin_fields()}
        self._outbox.put(lambda: iter([wire.pack(header)]))
        self._call = call(self._outbox.stream())
        self._result: Future[dict] = Future()
        threading.Thread(target=self._read, name=f"kv-send-{spec.request_id}", daemon=True).start()

    def send_layer(self, layer: int, pages: torch.Tensor) -> None:
        if tuple(pages.shape) != self.spec.layer_shape:
            raise ValueError(f"layer {layer}: pages {tuple(pages.shape)}, expected {self.spec.layer_shape}")
        prepared = self._writer.prepare(layer, pages)
        if prepared is not None:  # None: the layer went out of band with nothing to announce (no wake-up of gRPC)
            self._outbox.put(lambda: self._writer.messages(layer, prepared))

    def finish(self) -> int:
        if self._aborted is None:
            self._writer.seal()
            self._outbox.put(self._end)
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
        self._outbox.preempt(lambda: self._abort_message(reason))
        try:
            self._wait()
        except TransferError:
            pass  # the receiver is gone or gave up already: either way nothing is written any more

    def _end(self) -> Iterator[bytes]:
        handoff_trace.mark("sender.end", self.spec.request_id)
        self._writer.drain()
        yield wire.pack({"kind": wire.END, **self._writer.end_fields()})

    def _abort_message(self, reason: str) -> Iterator[bytes]:
        self._writer.drain()  # the receiver frees the pages once it reads this
        yield wire.pack({"kind": wire.ABORT, "reason": reason})

    def _read(self) -> None:
        """The receiver's answers, on this transfer's reader thread, until RESULT or the call's end."""
        try:
            for data in self._call:
                msg = wire.unpack(data)
                if msg.kind == wire.READY:
                    self._writer.ready()
                elif msg.kind == wire.STOP:  # the receiver aborted and holds its pages until we confirm
                    self._writer.halt()
                    self._outbox.preempt(lambda: self._abort_message("stopped by the receiver"))
                elif msg.kind == wire.RESULT:  # the transfer is over: no need to wait for the call's trailers
                    self._result.set_result(msg.header)
                    return
            self._result.set_exception(IntegrityError(f"{self._peer}: the call ended without a result"))
        except grpc.RpcError as err:
            self._result.set_exception(error_from_rpc(err, self._peer))
        except Exception as err:  # a writer hook failed: finish() must still return, with the cause
            log.exception("kv_transfer to %s: reading the receiver's answers failed", self._peer)
            self._call.cancel()
            self._result.set_exception(TransferError(f"{self._peer}: {err}"))
        finally:
            self._writer.halt()
            self._outbox.close()  # a failed call stops the generator

    def _wait(self) -> dict:
        try:
            return self._reply()
        except (PeerUnavailable, TransferTimeout):
            self._writer.lost()
            raise

    def _reply(self) -> dict:
        """The result; TransferTimeout only when gRPC pulled nothing for timeout_s and the call did not end."""
        while True:
            try:
                return self._result.result(timeout=0.2)
            except FutureTimeout:
                if time.monotonic() - self._outbox.last_progress > self._timeout_s:
                    self._call.cancel()
                    raise TransferTimeout(f"{self._peer}: no progress for {self._timeout_s:g} s") from None


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
        on_close: Callable[[], None] | None = None,
    ):
        self.address = address
        self._on_close = on_close
        self.backend = backend
        self._writer_factory = writer_factory
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message))
        self._call = self._channel.stream_stream(
            wire.METHOD, request_serializer=wire.identity, response_deserializer=wire.identity
        )

    def begin(self, spec: TransferSpec) -> StreamHandle:
        return StreamHandle(self._call, spec, self._writer_factory(spec), self.address, self._timeout_s)

    def close(self) -> None:
        self._channel.close()
        if self._on_close is not None:
            self._on_close()
