"""The tcp backend: each layer's bytes on a plain TCP connection, the control on the receiver's gRPC call.

grpcio copies every message once on send and twice on receive under the interpreter lock, which caps the grpc
backend well below a loopback socket (docs/benchmarks.md has the figures).
Here BEGIN, READY, END and the result stay on the gRPC call, so aborts, timeouts and a lost peer work as they do
for grpc, while a sender's layers go as frames on one TCP connection per sender and receiver, which the receiver
reads with ``recv_into`` straight into the transfer's staging buffer; at END the layers land in one copy.

A frame is ``[u32 header length][msgpack {"key", "layer", "bytes"}][payload]``. A sender sends a transfer's frames
only once READY came, so the receiver knows the key by then; a frame it does not know (its transfer was aborted or
refused meanwhile) is read and dropped, which keeps the connection in step.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgpack
import torch

from splitserve.kv_transfer import codec, wire
from splitserve.kv_transfer.base import TransferSpec
from splitserve.kv_transfer.errors import IntegrityError, PeerUnavailable, TransferTimeout
from splitserve.kv_transfer.expectations import Expectation
from splitserve.kv_transfer.grpc_server import AbortMode, OutOfBand
from splitserve.kv_transfer.grpc_writer import StagedLayer
from splitserve.kv_transfer.stream_sender import LayerWriter
from splitserve.netaddr import join_host_port, split_host_port

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
_DISCARD = 1 << 20  # bytes read at a time from a frame nobody waits for
_SPARES = 4  # staging buffers kept for reuse (CPU sinks)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _recv_into(conn: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``conn``; ConnectionError if the peer closes first."""
    while view:
        n = conn.recv_into(view)
        if n == 0:
            raise ConnectionError("the sender closed the connection mid-frame")
        view = view[n:]


def _recv_bytes(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(conn, memoryview(buf))
    return bytes(buf)


@dataclass(eq=False)
class _Staging:
    """One transfer's layers as they come in: ``buf`` [layers, encoded layer bytes], filled by the readers."""

    key: str
    spec: TransferSpec
    codec: str
    checksum: bool
    layer_size: int
    buf: torch.Tensor
    claimed: set[int] = field(default_factory=set)  # layers a reader has started to receive
    received: set[int] = field(default_factory=set)
    conns: set[int] = field(default_factory=set)  # ids of the connections its frames came on
    lost: str | None = None  # why one of those connections failed


class TcpInbox(OutOfBand):
    """Receiver side: a listening socket, a reader thread per sender connection, one staging buffer per transfer."""

    on_receiver_abort = AbortMode.CUT  # the server answers at once; frames still on their way are dropped

    def __init__(self, host: str, timeout_s: float, pin_memory: bool):
        self._timeout_s = timeout_s
        self._pin = pin_memory
        self._listener = socket.create_server((host, 0), family=_family(host))
        self.address = join_host_port(host, self._listener.getsockname()[1])
        self._open: dict[str, _Staging] = {}
        # Staging memory of finished transfers, kept for the next ones on a CPU sink: the CPU allocator hands back
        # fresh pages for a large buffer, and faulting them in as the bytes arrive halved the rate on the CPU box.
        # Pinned buffers need none of this: PyTorch's pinned allocator caches them, with the syncs that needs.
        self._spares: list[torch.Tensor] = []
        self._conns: dict[int, socket.socket] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._accept, name="kv-tcp-accept", daemon=True).start()

    def open(self, spec: TransferSpec, begin: dict) -> _Staging:
        key, codec_name = begin.get("key"), begin.get("codec", "none")
        if not isinstance(key, str) or codec_name not in codec.CODECS:
            raise IntegrityError("tcp: BEGIN without a transfer key or with an unknown codec")
        size = codec.encoded_size(codec_name, spec.torch_dtype, spec.layer_shape)
        buf = self._buffer(spec.num_layers * size).view(spec.num_layers, size)
        staging = _Staging(key, spec, codec_name, bool(begin.get("checksum")), size, buf)
        with self._cond:
            if key in self._open:
                raise IntegrityError(f"tcp: transfer key {key} is in use")
            self._open[key] = staging
        return staging

    def close(self, exp: Expectation, opened: object, end: dict) -> None:
        """At END: wait until every layer the sender says it sent is in, then land them in one copy."""
        assert isinstance(opened, _Staging)
        sent = end.get("layers")
        if not isinstance(sent, int) or not 0 <= sent <= exp.spec.num_layers:
            raise IntegrityError(f"{exp.spec.request_id}: END says {sent!r} layers were sent")
        exp.future.add_done_callback(lambda _: self._poke())  # an abort meanwhile ends the wait
        with self._cond:
            arrived = self._cond.wait_for(
                lambda: opened.lost is not None or exp.done or len(opened.received) >= sent, self._timeout_s
            )
        self.discard(opened)
        if exp.done:
            return  # aborted while its layers came: the server reports it
        if opened.lost is not None:
            raise PeerUnavailable(f"{exp.spec.request_id}: {opened.lost}")
        if not arrived:
            raise TransferTimeout(f"{exp.spec.request_id}: the sender's layers never arrived")
        if opened.received != set(range(sent)):
            raise IntegrityError(
                f"{exp.spec.request_id}: layers {sorted(opened.received)[:8]} are not the first {sent}"
            )
        layers = opened.buf[:sent]
        if opened.checksum:
            crc = 0
            for row in layers:
                crc = codec.crc32(row.numpy().data, crc)
            if crc != end.get("checksum"):
                raise IntegrityError(f"{exp.spec.request_id}: checksum mismatch")
        spec = exp.spec
        pages = (
            codec.from_bytes(layers, spec.torch_dtype, (sent, *spec.layer_shape))
            if opened.codec == "none"
            else torch.stack([codec.decode(row, opened.codec, spec.torch_dtype, spec.layer_shape) for row in layers])
        )
        exp.land_layers(0, pages, opened.layer_size)
        self._recycle(opened)

    def discard(self, opened: object) -> None:
        with self._cond:
            if isinstance(opened, _Staging) and self._open.get(opened.key) is opened:
                del self._open[opened.key]

    def shutdown(self) -> None:
        self._listener.close()
        with self._cond:
            conns = list(self._conns.values())
        for conn in conns:
            conn.close()

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of staging memory: the smallest spare that holds them, else a new buffer."""
        if not self._pin:
            with self._cond:
                fits = [i for i, b in enumerate(self._spares) if b.numel() >= nbytes]
                if fits:  # by index: list.remove would compare tensors element by element
                    best = self._spares.pop(min(fits, key=lambda i: self._spares[i].numel()))
                    return best[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)

    def _recycle(self, staging: _Staging) -> None:
        """Keep a landed transfer's staging memory, unless a reader may still be writing into it."""
        with self._cond:
            busy = staging.claimed != staging.received
        if self._pin or busy:
            return
        whole = staging.buf.view(-1)
        base = torch.empty(0, dtype=torch.uint8).set_(whole.untyped_storage())  # the spare's full size
        with self._cond:
            self._spares.append(base)
            if len(self._spares) > _SPARES:
                self._spares.sort(key=torch.Tensor.numel)
                del self._spares[0]

    def _poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self._conns[id(conn)] = conn
            threading.Thread(target=self._read, args=(conn,), name="kv-tcp-read", daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        """Frames of one sender connection until it closes; a failure mid-way fails the transfers it carried."""
        why = "the sender's connection closed"
        try:
            while (head := conn.recv(_LEN.size, socket.MSG_WAITALL)) and len(head) == _LEN.size:
                header = msgpack.unpackb(_recv_bytes(conn, _LEN.unpack(head)[0]), raw=False)
                self._frame(conn, header["key"], header["layer"], header["bytes"])
        except (OSError, ValueError, KeyError, msgpack.UnpackException) as err:
            why = f"the sender's connection failed: {err}"
        finally:
            conn.close()
            with self._cond:
                self._conns.pop(id(conn), None)
                for staging in self._open.values():
                    if id(conn) in staging.conns:
                        staging.lost = why
                self._cond.notify_all()

    def _frame(self, conn: socket.socket, key: str, layer: int, nbytes: int) -> None:
        with self._cond:
            staging = self._open.get(key)
            if (
                staging is not None
                and nbytes == staging.layer_size
                and 0 <= layer < staging.spec.num_layers
                and layer not in staging.claimed
            ):
                staging.claimed.add(layer)
                staging.conns.add(id(conn))
            else:
                staging = None
        if staging is None:
            self._drop(conn, nbytes)
            return
        _recv_into(conn, staging.buf[layer].numpy().data.cast("B"))
        with self._cond:
            staging.received.add(layer)
            self._cond.notify_all()

    @staticmethod
    def _drop(conn: socket.socket, nbytes: int) -> None:
        scratch = memoryview(bytearray(min(nbytes, _DISCARD)))
        while nbytes:
            take = min(nbytes, len(scratch))
            _recv_into(conn, scratch[:take])
            nbytes -= take


class TcpLink:
    """Sender side: one connection to a receiver's inbox, shared by the transfers of one sender (a frame is sent
    whole, one at a time) and opened again after a failure; calling it gives a transfer its writer."""

    def __init__(self, address: str, compression: str, checksum: bool, timeout_s: float):
        if compression not in codec.CODECS:
            raise ValueError(f"compression: {compression!r} (fix: one of {', '.join(codec.CODECS)})")
        self.address = address
        self.compression = compression
        self.checksum = checksum
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def __call__(self, spec: TransferSpec) -> TcpWriter:
        return TcpWriter(self, self.checksum or spec.checksum)

    def send(self, key: str, layer: int, payload: memoryview) -> None:
        head = msgpack.packb({"key": key, "layer": layer, "bytes": len(payload)}, use_bin_type=True)
        with self._lock:
            try:
                sock = self._sock or self._connect()
                sock.sendall(_LEN.pack(len(head)) + head)
                sock.sendall(payload)
            except OSError as err:
                self._drop()
                raise PeerUnavailable(f"tcp {self.address}: {err}") from err

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connect(self) -> socket.socket:
        host, port = split_host_port(self.address)
        sock = socket.create_connection((host, port), timeout=self._timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class TcpWriter(LayerWriter):
    """One transfer's layers as frames on its sender's link, each sent from gRPC's thread once READY came."""

    transport = "tcp"

    def __init__(self, link: TcpLink, checksum: bool):
        self._link = link
        self._checksum = checksum
        self._key = uuid.uuid4().hex
        self._ready = threading.Event()
        self._halted = False
        self._sent = 0
        self._crc = 0

    def begin_fields(self) -> dict:
        return {"key": self._key, "codec": self._link.compression, "checksum": self._checksum}

    def prepare(self, layer: int, pages: torch.Tensor) -> StagedLayer:
        return StagedLayer.stage(pages, self._link.compression)

    def messages(self, layer: int, prepared: object) -> Iterator[wire.Outgoing]:
        assert isinstance(prepared, StagedLayer)
        self._ready.wait()  # the receiver knows the key once it answered READY (or the call is over: halt)
        if not self._halted:
            data = prepared.host_bytes()
            if self._checksum:
                self._crc = codec.crc32(data, self._crc)
            self._link.send(self._key, layer, data)
            self._sent += 1
        return iter(())

    def ready(self) -> None:
        self._ready.set()

    def halt(self) -> None:
        self._halted = True
        self._ready.set()

    def end_fields(self) -> dict:
        return {"layers": self._sent, "checksum": self._crc if self._checksum else None}

    def lost(self) -> None:
        self._link.close()  # the next transfer connects afresh
