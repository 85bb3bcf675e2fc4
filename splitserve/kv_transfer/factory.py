"""Build senders and receivers from ``kv_transfer`` config: the only place that knows every backend."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from splitserve.config import KVTransferConfig
from splitserve.kv_transfer.auto import choose_backend, nccl_available
from splitserve.kv_transfer.base import PageSink, ReceiverEndpoint, Sender, TransferSpec
from splitserve.kv_transfer.grpc_writer import InlineWriter
from splitserve.kv_transfer.local import LocalSender
from splitserve.kv_transfer.peer import this_process
from splitserve.kv_transfer.receiver import _HEADROOM, KVReceiver
from splitserve.kv_transfer.stream_sender import LayerWriter, StreamSender

log = logging.getLogger(__name__)


def _sink_device(sink: PageSink | None) -> torch.device:
    device = getattr(sink, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def make_receiver(
    config: KVTransferConfig, sink: PageSink | None, *, host: str = "127.0.0.1", port: int = 0
) -> KVReceiver:
    """A receiver for ``sink`` (a ModelRunner, or anything with scatter_layers). ``auto`` offers every backend
    this process can serve; the sender picks one per endpoint."""
    device = _sink_device(sink)
    backend = config.backend.value
    if backend == "auto":
        wanted = ["local", "grpc", "tcp"]
        if device.type == "cuda":
            wanted += ["cuda_ipc"] + (["nccl"] if nccl_available() else [])
    else:
        wanted = [backend]
    out_of_band: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if "cuda_ipc" in wanted:
        from splitserve.kv_transfer import cuda_ipc

        extra["ipc_handle"] = cuda_ipc.export_kv_cache(sink.kv_cache)  # type: ignore[union-attr]
        out_of_band["cuda_ipc"] = cuda_ipc.RECEIVE
    if "tcp" in wanted:
        from splitserve.kv_transfer import tcp

        tcp_inbox = tcp.TcpInbox(host, config.timeout_s, pin_memory=device.type == "cuda")
        extra["tcp_address"] = tcp_inbox.address
        out_of_band["tcp"] = tcp_inbox
    if "nccl" in wanted:
        from splitserve.kv_transfer import nccl

        inbox = nccl.NcclInbox(device, host, config.timeout_s)
        extra["nccl_store"] = inbox.store_address
        out_of_band["nccl"] = inbox
    return KVReceiver(
        sink,
        backends=tuple(wanted),
        device=device,
        chunk_bytes=config.chunk_bytes,
        timeout_s=config.timeout_s,
        host=host,
        port=port,
        out_of_band=out_of_band,
        extra=extra,
    )


def make_sender(
    config: KVTransferConfig, endpoint: ReceiverEndpoint, device: torch.device | str | None = None
) -> Sender:
    """A sender to one receiver; ``auto`` picks the backend from both ends (logged with its reason)."""
    backend = config.backend.value
    if backend == "auto":
        backend, why = choose_backend(endpoint, this_process(device))
        log.info("kv_transfer to %s: %s (%s)", endpoint.address or endpoint.receiver_id, backend, why)
    elif backend not in endpoint.backends:
        raise ValueError(f"kv_transfer.backend: the receiver offers {list(endpoint.backends)}, not {backend!r}")
    if backend == "local":
        return LocalSender(endpoint)
    if endpoint.address is None:
        raise ValueError(f"kv_transfer: backend {backend!r} needs a receiver with a gRPC address")
    writer: Callable[[TransferSpec], LayerWriter]
    on_close: Callable[[], None] | None = None
    if backend == "grpc":

        def writer(spec: TransferSpec) -> InlineWriter:
            return InlineWriter(config.chunk_bytes, config.compression, config.checksum or spec.checksum)

    elif backend == "tcp":
        from splitserve.kv_transfer import tcp

        if endpoint.tcp_address is None:
            raise ValueError("kv_transfer: backend 'tcp' needs a receiver with a tcp address")
        link = tcp.TcpLink(endpoint.tcp_address, config.compression, config.checksum, config.timeout_s)
        writer, on_close = link, link.close
    elif backend == "cuda_ipc":
        from splitserve.kv_transfer import cuda_ipc

        writer = cuda_ipc.writer_factory(endpoint)
    else:
        from splitserve.kv_transfer import nccl

        writer = nccl.writer_factory(endpoint)
    return StreamSender(
        endpoint.address,
        writer,
        max_message=config.chunk_bytes + _HEADROOM,
        timeout_s=config.timeout_s,
        backend=backend,
        on_close=on_close,
    )
