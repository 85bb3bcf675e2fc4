"""The framing of transfer messages: ``[u32 big-endian header length][msgpack header][raw payload]``.

A sender keeps one bidirectional RPC open to each receiver (a session) and runs every transfer to it on that call;
each header carries ``t``, the transfer's number in the session (a call's set-up costs more than a large
transfer's bytes). Per transfer the sender sends BEGIN (the spec), then per layer
the CHUNKs carrying its bytes (grpc; the out-of-band backends send nothing per layer), then END (with the checksum
or the layers it moved) or ABORT. The receiver answers READY once it has claimed the reserved pages (a sender that
writes into them itself waits for it), STOP when it aborts a transfer whose sender must stop writing and say so
with ABORT, and RESULT last, or ERROR (a gRPC status code's name and details, see ``status.py``) in its place.
A failed session (a status on the call itself) fails every transfer on it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

SERVICE = "splitserve.kv.KVTransfer"
METHOD = f"/{SERVICE}/Transfer"

BEGIN, CHUNK, END, ABORT = "begin", "chunk", "end", "abort"  # sender -> receiver
READY, STOP, RESULT, ERROR = "ready", "stop", "result", "error"  # receiver -> sender

Outgoing = tuple[dict, "bytes | memoryview"]  # a header and its payload, before framing

_LEN = struct.Struct(">I")


@dataclass
class Message:
    header: dict
    payload: memoryview  # empty unless a CHUNK

    @property
    def kind(self) -> str:
        return self.header["kind"]


def pack(header: dict, payload: bytes | memoryview = b"") -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return b"".join((_LEN.pack(len(head)), head, payload))


def chunk(layer: int, offset: int, total: int, payload: memoryview) -> Outgoing:
    """One slice of a layer's encoded bytes (tests patch this to corrupt the wire)."""
    return {"kind": CHUNK, "layer": layer, "offset": offset, "total": total}, payload


def unpack(data: bytes) -> Message:
    view = memoryview(data)
    (n,) = _LEN.unpack_from(view)
    header = msgpack.unpackb(view[_LEN.size : _LEN.size + n], raw=False)
    return Message(header, view[_LEN.size + n :])


def identity(data: bytes) -> bytes:
    """gRPC (de)serializer: messages are already bytes, no protobuf involved."""
    return data
