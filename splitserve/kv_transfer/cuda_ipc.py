"""The cuda_ipc backend: the sender writes straight into the receiver's KV cache through a CUDA IPC handle.

The receiver exports its whole cache tensor once (in its endpoint); a sender on the same node that can see the same
physical GPU opens it (by UUID: Ray gives each actor its own CUDA_VISIBLE_DEVICES, so device indices differ) and
copies each layer's pages into the destination blocks on a side stream, issued as soon as the layer is done
(``copy_issuer``: issued earlier, a copy could not be taken back from the stream before the pass ended). gRPC carries
only control: BEGIN; READY once the receiver has claimed the pages (no copy is issued before it: the pages of a
transfer aborted before it began may already belong to another request); END, with the layers moved, after the side
stream has been synchronized. A receiver abort is answered with STOP, and the receiver keeps the pages out of reuse
(``KVReceiver.unwritten``) until the sender, having synchronized, answers ABORT.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from splitserve.engine.page_copy import scatter_pages, select_blocks
from splitserve.kv_transfer import wire
from splitserve.kv_transfer.base import ReceiverEndpoint, TransferSpec
from splitserve.kv_transfer.copy_issuer import CopyIssuer, LayerCopies
from splitserve.kv_transfer.errors import IntegrityError
from splitserve.kv_transfer.expectations import Expectation
from splitserve.kv_transfer.grpc_server import AbortMode, OutOfBand
from splitserve.kv_transfer.peer import gpu_uuid, local_cuda_index, this_process
from splitserve.kv_transfer.stream_sender import LayerWriter

ISSUER = CopyIssuer("cuda_ipc copies")
_STORAGE_CLASSES = {"TypedStorage": torch.TypedStorage, "UntypedStorage": torch.UntypedStorage}


def export_kv_cache(kv_cache: torch.Tensor) -> bytes:
    """The IPC handle of the cache as msgpack (no pickle), with the GPU named by UUID instead of index."""
    rebuild, args = reduce_tensor(kv_cache)
    if rebuild is not rebuild_cuda_tensor:
        raise ValueError("cuda_ipc: the KV cache is not a CUDA tensor")
    (
        _,
        size,
        stride,
        offset,
        storage_cls,
        dtype,
        _device,
        handle,
        nbytes,
        storage_offset,
        _grad,
        ref_handle,
        ref_offset,
        event_handle,
        event_sync,
    ) = args
    return msgpack.packb(
        {
            "size": list(size),
            "stride": list(stride),
            "offset": offset,
            "storage_cls": storage_cls.__name__,
            "dtype": str(dtype).removeprefix("torch."),
            "gpu_uuid": gpu_uuid(kv_cache.device),
            "handle": handle,
            "nbytes": nbytes,
            "storage_offset": storage_offset,
            "ref_handle": ref_handle,
            "ref_offset": ref_offset,
            "event_handle": event_handle,
            "event_sync": event_sync,
        },
        use_bin_type=True,
    )


def open_kv_cache(blob: bytes) -> torch.Tensor:
    d = msgpack.unpackb(blob, raw=False)
    index = local_cuda_index(d["gpu_uuid"])
    if index is None:
        raise RuntimeError(f"cuda_ipc: GPU {d['gpu_uuid']} is not visible in this process")
    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(d["size"]),
        tuple(d["stride"]),
        d["offset"],
        _STORAGE_CLASSES[d["storage_cls"]],
        getattr(torch, d["dtype"]),
        index,
        d["handle"],
        d["nbytes"],
        d["storage_offset"],
        False,
        d["ref_handle"],
        d["ref_offset"],
        d["event_handle"],
        d["event_sync"],
    )


class IpcInbox(OutOfBand):
    on_receiver_abort = AbortMode.STOP
    hooks_block = False

    def close(self, exp: Expectation, opened: object, end: dict) -> None:
        """The sender already wrote the pages it names; just count them."""
        layers = end.get("layers")
        if not isinstance(layers, list) or not all(isinstance(n, int) for n in layers):
            raise IntegrityError(f"{exp.spec.request_id}: END names no layers ({layers!r})")
        for layer in layers:
            exp.mark_written(layer, exp.spec.layer_bytes)


RECEIVE = IpcInbox()


@dataclass
class _Pending:
    pages: torch.Tensor
    event: torch.cuda.Event  # the producer stream's work on ``pages``


class IpcWriter(LayerWriter):
    """Copies each layer into the receiver's pages on a side stream, issued by ``ISSUER`` once the layer is done,
    so that a stop waits for the copies running, never for the rest of the pass."""

    transport = "cuda_ipc"

    def __init__(self, remote_kv: torch.Tensor, spec: TransferSpec, stream: torch.cuda.Stream):
        self._remote = remote_kv
        self._stream = stream
        # The index goes to the device on the stream that reads it: a deferred transfer is begun on the actor's
        # loop thread, whose current stream can be queued behind a whole prefill pass, and an index copied there
        # could be read by this stream before the copy ran.
        with torch.cuda.stream(stream):
            self._blocks = select_blocks(spec.dst_block_ids, remote_kv.device)
        self._heads = spec.head_link.dst_slice  # a link of a transfer between TP degrees writes its heads only
        self._go = threading.Event()  # READY came, or the transfer is over
        self._copies = LayerCopies(ISSUER, self._copy, stream.synchronize)

    def begin_fields(self) -> dict:
        return {"checksum": False}

    def prepare(self, layer: int, pages: torch.Tensor) -> _Pending | None:
        """Once READY has come, hand the copy to the issuer here, on the engine's thread; before, leave it to gRPC's
        thread, which waits for READY."""
        event = torch.cuda.Event(blocking=True)  # the issuer waits on it asleep, not spinning
        event.record()
        if self._go.is_set():
            self._copies.submit(layer, event.synchronize, pages)
            return None
        return _Pending(pages, event)

    def messages(self, layer: int, prepared: object) -> Iterator[wire.Outgoing]:
        assert isinstance(prepared, _Pending)
        self._go.wait()  # READY, STOP or the end of the call sets it
        self._copies.submit(layer, prepared.event.synchronize, prepared.pages)
        yield from ()  # nothing goes on the wire per layer

    def _copy(self, layer: int, pages: torch.Tensor) -> None:
        """On the issuer's thread, once ``pages`` is produced."""
        with torch.cuda.device(self._remote.device), torch.cuda.stream(self._stream):
            scatter_pages(self._remote[layer], self._blocks, pages.to(self._remote.device), self._heads)
        pages.record_stream(self._stream)  # the allocator must not reuse it before the side stream is done

    def ready(self) -> None:
        self._go.set()

    def halt(self) -> None:
        self._copies.halt()
        self._go.set()

    def drain(self) -> None:
        self._copies.drain()

    def end_fields(self) -> dict:
        return {"layers": self._copies.written()}


def writer_factory(endpoint: ReceiverEndpoint) -> Callable[[TransferSpec], IpcWriter]:
    if endpoint.ipc_handle is None:
        raise ValueError("cuda_ipc: the receiver exported no KV cache handle")
    if endpoint.in_process(this_process()):
        raise ValueError("cuda_ipc: the receiver is in this process, where CUDA cannot open its handle (use local)")
    remote = open_kv_cache(endpoint.ipc_handle)
    stream = torch.cuda.Stream(device=remote.device)
    return lambda spec: IpcWriter(remote, spec, stream)
