"""The framing of one transfer's messages: ``[u32 big-endian header length][msgpack header][raw payload]``.

A transfer is one client-streaming RPC: BEGIN (the spec), then per layer either CHUNKs carrying the bytes (grpc)
or one LAYER marker for data moved out of band (cuda_ipc, nccl), then END (with the checksum) or ABORT. The reply
is a msgpack ack; failures are gRPC status codes (see ``status.py``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

SERVICE = "splitserve.kv.KVTransfer"
METHOD = f"/{SERVICE}/Transfer"

BEGIN, CHUNK, LAYER, END, ABORT = "begin", "chunk", "layer", "end", "abort"

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
