"""The grpc backend's LayerWriter: a layer's bytes inline, in as few messages as ``chunk_bytes`` allows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from splitserve.kv_transfer import codec, wire
from splitserve.kv_transfer.stream_sender import LayerWriter


@dataclass
class _Staged:
    pages: torch.Tensor  # CPU pages, or their encoded bytes in pinned memory when they came from a GPU
    ready: torch.cuda.Event | None  # the device-to-host copy's completion


class InlineWriter(LayerWriter):
    transport = "grpc"
    interruptible = True  # a layer cut short by an abort is simply discarded by the receiver

    def __init__(self, chunk_bytes: int, compression: str, checksum: bool):
        if compression not in codec.CODECS:
            raise ValueError(f"compression: {compression!r} (fix: one of {', '.join(codec.CODECS)})")
        self._chunk = chunk_bytes
        self._codec = compression
        self._checksum = checksum
        self._crc = 0

    def begin_fields(self) -> dict:
        return {"codec": self._codec, "checksum": self._checksum}

    def prepare(self, layer: int, pages: torch.Tensor) -> _Staged:
        """On a GPU: quantize there, then start the copy to pinned host memory without waiting for it."""
        if pages.device.type != "cuda":
            return _Staged(pages, None)
        encoded = codec.encode_tensor(pages, self._codec)
        host = torch.empty(encoded.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(encoded, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Staged(host, ready)

    def messages(self, layer: int, prepared: object) -> Iterator[bytes]:
        assert isinstance(prepared, _Staged)
        if prepared.ready is not None:
            prepared.ready.synchronize()
            data = codec.to_host_bytes(prepared.pages)  # already encoded on the device
        else:
            data = codec.encode(prepared.pages, self._codec)
        total = len(data)
        for offset in range(0, total, self._chunk):
            part = data[offset : offset + self._chunk]
            if self._checksum:
                self._crc = codec.crc32(part, self._crc)
            yield wire.pack_chunk(layer, offset, total, part)

    def end_fields(self) -> dict:
        return {"checksum": self._crc if self._checksum else None}
