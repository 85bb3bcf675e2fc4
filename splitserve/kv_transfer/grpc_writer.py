"""The grpc backend's LayerWriter: a layer's bytes inline, in as few messages as ``chunk_bytes`` allows; and how a
layer's bytes reach the host for any writer that sends them from there (grpc, tcp)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from splitserve.kv_transfer import codec, wire
from splitserve.kv_transfer.stream_sender import LayerWriter


@dataclass
class StagedLayer:
    """One layer on its way to the host: CPU pages, or their encoded bytes in pinned memory when they came from a
    GPU, with the device-to-host copy's completion."""

    pages: torch.Tensor
    ready: torch.cuda.Event | None
    codec: str

    @classmethod
    def stage(cls, pages: torch.Tensor, codec_name: str) -> StagedLayer:
        """On a GPU: encode there, then start the copy to pinned host memory without waiting for it (this runs in
        the layer hook, which must not wait for the device)."""
        if pages.device.type != "cuda":
            return cls(pages, None, codec_name)
        encoded = codec.encode_tensor(pages, codec_name)
        host = torch.empty(encoded.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(encoded, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(host, ready, codec_name)

    def host_bytes(self) -> memoryview:
        """The encoded bytes, once on the host (waits for the copy)."""
        if self.ready is not None:
            self.ready.synchronize()
            return codec.to_host_bytes(self.pages)  # already encoded on the device
        return codec.encode(self.pages, self.codec)


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

    def prepare(self, layer: int, pages: torch.Tensor) -> StagedLayer:
        return StagedLayer.stage(pages, self._codec)

    def messages(self, layer: int, prepared: object) -> Iterator[wire.Outgoing]:
        assert isinstance(prepared, StagedLayer)
        data = prepared.host_bytes()
        total = len(data)
        for offset in range(0, total, self._chunk):
            part = data[offset : offset + self._chunk]
            if self._checksum:
                self._crc = codec.crc32(part, self._crc)
            yield wire.chunk(layer, offset, total, part)

    def end_fields(self) -> dict:
        return {"checksum": self._crc if self._checksum else None}
