"""The framing of one transfer's messages: ``[u32 big-endian header length][msgpack header][raw payload]``.

A transfer is one bidirectional RPC. The sender sends BEGIN (the spec), then per layer the CHUNKs carrying its
bytes (grpc; the out-of-band backends, cuda_ipc and nccl, send nothing per layer), then END (with the checksum or
the layers it moved) or ABORT. The receiver answers READY once it has claimed the reserved pages (a sender that
writes into them itself waits for it), STOP when it aborts a transfer whose sender must stop writing and say so
with ABORT, and RESULT last. Failures are gRPC status codes (see ``status.py``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

SERVICE = "splitserve.kv.KVTransfer"
METHOD = f"/{SERVICE}/Transfer"

BEGIN, CHUNK, END, ABORT = "begin", "chunk", "end", "abort"  # sender -> receiver
READY, STOP, RESULT = "ready", "stop", "result"  # receiver -> sender

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


def pack_chunk(layer: int, offset: int, total: int, payload: memoryview) -> bytes:
    """One slice of a layer's encoded bytes (tests patch this to corrupt the wire)."""
    return pack({"kind": CHUNK, "layer": layer, "offset": offset, "total": total}, payload)


def unpack(data: bytes) -> Message:
    view = memoryview(data)
    (n,) = _LEN.unpack_from(view)
    header = msgpack.unpackb(view[_LEN.size : _LEN.size + n], raw=False)
    return Message(header, view[_LEN.size + n :])


def identity(data: bytes) -> bytes:
    """gRPC (de)serializer: messages are already bytes, no protobuf involved."""
    return data
