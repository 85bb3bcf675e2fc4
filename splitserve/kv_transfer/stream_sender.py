"""The sending side of every remote backend: one long-lived bidirectional RPC per receiver (a session) that
carries every transfer to it, each transfer fed from a queue of its own.

``send_layer`` only queues; gRPC's own thread pulls the session's messages from one generator that takes the next
item of each transfer with something queued, in turn, and encodes (or moves out of band) one layer at a time, so
the engine's layer hook never waits for the network and HTTP/2 flow control paces the rest. The session's reader
thread hands the receiver's answers (READY, STOP, RESULT, ERROR) to their transfers. A call's set-up costs more
than a large transfer's bytes over loopback; a session pays it once. The abort of a begun transfer goes before
every other transfer's queued items, since the receiver frees the pages when it reads it. What moves a layer is a
``LayerWriter``: inline chunks (grpc), frames on a socket (tcp), a copy into the peer's memory (cuda_ipc), or an
NCCL send (nccl).
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
    PeerUnavailable,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from splitserve.kv_transfer.grpc_server import channel_options
from splitserve.kv_transfer.status import error_from_code, error_from_rpc

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

    def messages(self, layer: int, prepared: object) -> Iterator[wire.Outgoing]:
        """Runs on gRPC's thread: move the layer, yield the messages that announce or carry it. It may wait (for
        READY, say): the session's other transfers wait meanwhile, but their answers do not."""
        raise NotImplementedError

    def seal(self) -> None:
        """No more layers come (finish or abort), on the caller's thread: e.g. pad what the peer still awaits."""

    def ready(self) -> None:
        """The receiver claimed its pages (READY), on the reader thread: a writer that writes them itself may."""

    def halt(self) -> None:
        """Write nothing more (the receiver said STOP, the transfer is aborted, or the call is over), on the reader
        thread or gRPC's."""

    def drain(self) -> None:
        """Before END or ABORT (after ``halt``), on gRPC's thread: wait until nothing this writer issued can still
        write; before END, until every layer is written."""

    def end_fields(self) -> dict:
        """The END header's own fields, after ``drain``: e.g. the checksum, or the layers moved."""
        return {}

    def lost(self) -> None:
        """The peer is gone or went silent: e.g. stop reusing state shared with it."""


Item = Callable[[], Iterator[wire.Outgoing]]


class _Outbox:
    """One transfer's messages (or thunks producing them) waiting for its session to pull them; abort drops what is
    queued. ``wake(urgent)`` tells the session there is one more item, an urgent one (an abort) to take first."""

    def __init__(self, wake: Callable[[bool], None], interruptible: bool = False):
        self._wake = wake
        self._items: deque[Item] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._interrupt = False
        self._started = False  # the session pulled the first item (BEGIN): an abort must never drop it
        self._interruptible = interruptible  # the item being sent may be cut short (inline chunks: yes; nccl: no)

    def put(self, item: Item) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._items.append(item)
        self._wake(False)
        return True

    def preempt(self, item: Item) -> None:
        """Drop everything queued and send ``item`` next, even after ``close()`` (an abort after finish() started:
        the layers still queued must not keep flowing)."""
        with self._lock:
            keep = [self._items[0]] if self._items and not self._started else []  # BEGIN: the receiver needs it
            self._items.clear()
            self._items.extend([*keep, item])
            self._interrupt = self._interruptible
            self._closed = True
            started = self._started
        # Once BEGIN went, the abort goes before every other transfer's queued items. A BEGIN still queued keeps its
        # place: BEGINs reach the receiver in the order transfers began (nccl's receives are posted in that order).
        self._wake(started)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def take(self) -> Item | None:
        with self._lock:
            if not self._items:
                return None  # dropped by an abort after the session was woken for it
            self._started = True
            self._interrupt = False
            return self._items.popleft()

    @property
    def interrupted(self) -> bool:
        """An abort is waiting: stop the item being sent mid-way (the receiver discards it)."""
        return self._interrupt


class StreamHandle:
    """One transfer on a session; its messages carry the transfer number ``tid`` the session gave it."""

    def __init__(self, spec: TransferSpec, writer: LayerWriter, peer: str, timeout_s: float):
        self.spec = spec
        self._writer = writer
        self._peer = peer
        self._timeout_s = timeout_s
        self._aborted: str | None = None
        self._session: _Session | None = None
        self._tid = -1
        self._outbox = _Outbox(self._wake, interruptible=writer.interruptible)
        self._layers_sent: set[int] = set()
        self._ended = False  # END is queued: every layer was sent, or finish() came first
        self._result: Future[dict] = Future()
        self._settle_lock = threading.Lock()
        self.last_progress = time.monotonic()

    def attach(self, session: _Session, tid: int) -> None:
        """Called by the session that takes this transfer on: queue BEGIN."""
        self._session, self._tid = session, tid
        header = {"kind": wire.BEGIN, "spec": self.spec.to_wire(), "transport": self._writer.transport}
        self._outbox.put(lambda: iter([({**header, **self._writer.begin_fields()}, b"")]))

    def send_layer(self, layer: int, pages: torch.Tensor) -> None:
        if tuple(pages.shape) != self.spec.layer_shape:
            raise ValueError(f"layer {layer}: pages {tuple(pages.shape)}, expected {self.spec.layer_shape}")
        prepared = self._writer.prepare(layer, pages)
        if prepared is not None:  # None: the layer went out of band with nothing to announce (no wake-up of gRPC)
            self._outbox.put(lambda: self._writer.messages(layer, prepared))
        self._layers_sent.add(layer)
        if len(self._layers_sent) == self.spec.num_layers:
            self._queue_end()  # the receiver can complete while this pass still computes its logits and samples

    def finish(self) -> int:
        self._queue_end()
        reply = self._wait()
        if self._aborted is not None or not reply.get("ok", False):
            raise TransferAborted(f"{self.spec.request_id}: aborted by the sender ({self._aborted})")
        return int(reply["bytes"])

    def _queue_end(self) -> None:
        if self._aborted is None and not self._ended:
            self._ended = True
            self._writer.seal()
            self._outbox.put(self._end)
            self._outbox.close()

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

    def pull(self) -> Iterator[bytes]:
        """The session's generator: this transfer's next item, framed; a writer that fails fails this transfer only."""
        item = self._outbox.take()
        if item is None:
            return
        try:
            for header, payload in item():
                yield wire.pack({**header, "t": self._tid}, payload)
                self.last_progress = time.monotonic()
                if self._outbox.interrupted:
                    break
        except Exception as err:
            if not isinstance(err, TransferError):
                log.exception("kv_transfer to %s: sending %s failed", self._peer, self.spec.request_id)
                err = TransferError(f"{self._peer}: {err}")
            self._give_up(err)

    def on_message(self, msg: wire.Message) -> None:
        """One of the receiver's answers, on the session's reader thread."""
        try:
            if msg.kind == wire.READY:
                self._writer.ready()
            elif msg.kind == wire.STOP:  # the receiver aborted and holds its pages until we confirm
                self._writer.halt()
                self._outbox.preempt(lambda: self._abort_message("stopped by the receiver"))
            elif msg.kind == wire.RESULT:
                self.on_end(result=msg.header)
            elif msg.kind == wire.ERROR:
                code, details = msg.header.get("code", ""), msg.header.get("details", "")
                self.on_end(error=error_from_code(code, details, self._peer))
        except Exception as err:  # a writer hook failed: finish() must still return, with the cause
            log.exception("kv_transfer to %s: handling %r failed", self._peer, msg.kind)
            self._give_up(TransferError(f"{self._peer}: {err}"))

    def on_end(self, result: dict | None = None, error: TransferError | None = None) -> None:
        """The transfer is over on the receiver's side (its answer), or the session is gone."""
        self._settle(result, error)
        if self._session is not None:
            self._session.forget(self._tid)
        self._writer.halt()
        self._outbox.close()

    def _give_up(self, err: TransferError) -> None:
        """Fail this transfer here, and tell the receiver so that it frees the pages now."""
        self._settle(None, err)
        self._writer.halt()
        self._outbox.preempt(lambda: self._abort_message(str(err)))

    def _settle(self, result: dict | None, error: TransferError | None) -> None:
        with self._settle_lock:
            if self._result.done():
                return
            if error is not None:
                self._result.set_exception(error)
            else:
                self._result.set_result(result or {})

    def _wake(self, urgent: bool) -> None:
        if self._session is not None:
            self._session.wake(self, urgent)

    def _end(self) -> Iterator[wire.Outgoing]:
        handoff_trace.mark("sender.end", self.spec.request_id)
        self._writer.drain()
        handoff_trace.mark("sender.drained", self.spec.request_id)
        yield {"kind": wire.END, **self._writer.end_fields()}, b""

    def _abort_message(self, reason: str) -> Iterator[wire.Outgoing]:
        self._writer.halt()  # the receiver frees the pages once it reads this: nothing may write them after
        self._writer.drain()
        yield {"kind": wire.ABORT, "reason": reason}, b""

    def _wait(self) -> dict:
        try:
            return self._reply()
        except (PeerUnavailable, TransferTimeout):
            self._writer.lost()
            raise

    def _reply(self) -> dict:
        """The result; TransferTimeout only when neither this transfer nor its session moved for timeout_s."""
        while True:
            try:
                return self._result.result(timeout=0.2)
            except FutureTimeout:
                assert self._session is not None
                if time.monotonic() - max(self.last_progress, self._session.last_progress) > self._timeout_s:
                    self._session.cancel()  # wedged: the transfers after this one get a fresh session
                    raise TransferTimeout(f"{self._peer}: no progress for {self._timeout_s:g} s") from None


class _Session:
    """One bidirectional call to a receiver carrying its transfers, until it fails or is closed. Its generator runs on
    gRPC's thread and takes one item per turn from each transfer that has one, in the order they asked."""

    def __init__(self, method: grpc.StreamStreamMultiCallable, peer: str):
        self._peer = peer
        self._cond = threading.Condition()
        self._runnable: deque[StreamHandle] = deque()  # one entry per item put (an item an abort dropped: a no-op)
        self._handles: dict[int, StreamHandle] = {}
        self._next_tid = 0
        self._over = False
        self.last_progress = time.monotonic()
        self._call = method(self._stream())
        threading.Thread(target=self._read, name=f"kv-session-{peer}", daemon=True).start()

    def register(self, handle: StreamHandle) -> bool:
        """Take the transfer on; False once this stream to the peer is over (the sender opens a new one)."""
        with self._cond:
            if self._over:
                return False
            tid, self._next_tid = self._next_tid, self._next_tid + 1
            self._handles[tid] = handle
            handle.attach(self, tid)
            return True

    def forget(self, tid: int) -> None:
        with self._cond:
            self._handles.pop(tid, None)
            self._cond.notify_all()  # a closed session ends with its last transfer

    def wake(self, handle: StreamHandle, urgent: bool = False) -> None:
        """``urgent``: the handle's next item goes before every other transfer's (an abort: the receiver frees its
        pages on reading it, and nothing queued behind it must delay that)."""
        with self._cond:
            if urgent:
                self._runnable.appendleft(handle)
            else:
                self._runnable.append(handle)
            self._cond.notify()

    def close(self) -> None:
        """No more transfers: the call ends once the receiver has answered the ones under way."""
        with self._cond:
            self._over = True
            self._cond.notify_all()

    def cancel(self) -> None:
        """End the call now: its transfers fail, and no new one is taken on (the sender opens a new session)."""
        with self._cond:
            self._over = True
        self._call.cancel()

    def _stream(self) -> Iterator[bytes]:
        while True:
            with self._cond:
                while not self._runnable and not (self._over and not self._handles):
                    self._cond.wait()
                if not self._runnable:
                    return
                handle = self._runnable.popleft()
            for message in handle.pull():
                yield message
                self.last_progress = time.monotonic()

    def _read(self) -> None:
        """The receiver's answers, each to its transfer, until the call ends; then every transfer left fails."""
        error: TransferError = PeerUnavailable(f"{self._peer}: the receiver ended the session")
        try:
            for data in self._call:
                msg = wire.unpack(data)
                with self._cond:
                    handle = self._handles.get(msg.header.get("t", -1))
                if handle is not None:
                    handle.on_message(msg)
        except grpc.RpcError as err:
            error = error_from_rpc(err, self._peer)
        finally:
            with self._cond:
                self._over = True
                left = list(self._handles.values())
                self._handles.clear()
                self._runnable.clear()
                self._cond.notify_all()
            for handle in left:
                handle.on_end(error=error)


class StreamSender:
    """Runs every transfer to one receiver on one session, opening a new session when the last one failed."""

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
        self._method = self._channel.stream_stream(
            wire.METHOD, request_serializer=wire.identity, response_deserializer=wire.identity
        )
        self._lock = threading.Lock()
        self._session: _Session | None = None

    def begin(self, spec: TransferSpec) -> StreamHandle:
        handle = StreamHandle(spec, self._writer_factory(spec), self.address, self._timeout_s)
        with self._lock:
            while self._session is None or not self._session.register(handle):
                self._session = _Session(self._method, self.address)
        return handle

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
        self._channel.close()
        if self._on_close is not None:
            self._on_close()
