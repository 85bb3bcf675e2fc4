"""Build senders and receivers from ``kv_transfer`` config, from a registry of backends: adding a backend is one
``register_backend`` call here (its name must also be a ``KVBackend`` value in config.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from splitserve.config import KVTransferConfig
from splitserve.kv_transfer.auto import choose_backend, nccl_available
from splitserve.kv_transfer.base import PageSink, Receiver, ReceiverEndpoint, Sender, TransferSpec
from splitserve.kv_transfer.grpc_server import OutOfBand
from splitserve.kv_transfer.grpc_writer import InlineWriter
from splitserve.kv_transfer.local import LocalSender
from splitserve.kv_transfer.peer import this_process
from splitserve.kv_transfer.receiver import _HEADROOM, KVReceiver
from splitserve.kv_transfer.stream_sender import LayerWriter, StreamSender

log = logging.getLogger(__name__)

WriterFactory = Callable[[TransferSpec], LayerWriter]


@dataclass(frozen=True)
class Inbox:
    """A receiver's way in outside the gRPC session: the path that takes the bytes, and the endpoint fields that
    tell senders how to reach it."""

    path: OutOfBand
    endpoint_fields: dict[str, Any]


@dataclass(frozen=True)
class Backend:
    """One way to move KV pages. ``writer`` gives a remote sender's per-transfer writer and what to close with the
    sender (None for the in-process backend, whose sender is ``LocalSender``); ``inbox`` opens the receiver's
    out-of-band way in (None: the bytes ride the gRPC session, or stay in the process)."""

    name: str
    offered_on: Callable[[torch.device], bool]  # whether ``auto`` offers it for a KV cache on this device
    writer: Callable[[KVTransferConfig, ReceiverEndpoint], tuple[WriterFactory, Callable[[], None] | None]] | None
    inbox: Callable[[KVTransferConfig, PageSink | None, torch.device, str], Inbox] | None = None


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    if backend.name in _BACKENDS or backend.name == "auto":
        raise ValueError(f"kv_transfer backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend


def backend_names() -> tuple[str, ...]:
    """Every registered backend, in the order ``auto`` offers them."""
    return tuple(_BACKENDS)


def _backend(name: str) -> Backend:
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"kv_transfer.backend: {name!r} is not a backend (fix: one of auto, {', '.join(_BACKENDS)})")
    return backend


def _sink_device(sink: PageSink | None) -> torch.device:
    device = getattr(sink, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def make_receiver(
    config: KVTransferConfig, sink: PageSink | None, *, host: str = "127.0.0.1", port: int = 0
) -> Receiver:
    """A receiver for ``sink`` (a ModelRunner, or anything with scatter_layers). ``auto`` offers every backend
    this process can serve; the sender picks one per endpoint."""
    device = _sink_device(sink)
    if config.backend.value == "auto":
        wanted = [b for b in _BACKENDS.values() if b.offered_on(device)]
    else:
        wanted = [_backend(config.backend.value)]
    out_of_band: dict[str, OutOfBand] = {}
    extra: dict[str, Any] = {}
    for backend in wanted:
        if backend.inbox is not None:
            inbox = backend.inbox(config, sink, device, host)
            out_of_band[backend.name] = inbox.path
            extra.update(inbox.endpoint_fields)
    return KVReceiver(
        sink,
        backends=tuple(b.name for b in wanted),
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
    name = config.backend.value
    if name == "auto":
        name, why = choose_backend(endpoint, this_process(device))
        log.info("kv_transfer to %s: %s (%s)", endpoint.address or endpoint.receiver_id, name, why)
    elif name not in endpoint.backends:
        raise ValueError(f"kv_transfer.backend: the receiver offers {list(endpoint.backends)}, not {name!r}")
    backend = _backend(name)
    if backend.writer is None:
        return LocalSender(endpoint)
    if endpoint.address is None:
        raise ValueError(f"kv_transfer: backend {name!r} needs a receiver with a gRPC address")
    writer, on_close = backend.writer(config, endpoint)
    return StreamSender(
        endpoint.address,
        writer,
        max_message=config.chunk_bytes + _HEADROOM,
        timeout_s=config.timeout_s,
        backend=name,
        on_close=on_close,
    )


# --- the backends ---


def _grpc_writer(config: KVTransferConfig, endpoint: ReceiverEndpoint) -> tuple[WriterFactory, None]:
    def writer(spec: TransferSpec) -> InlineWriter:
        return InlineWriter(config.chunk_bytes, config.compression, config.checksum or spec.checksum)

    return writer, None


def _tcp_writer(config: KVTransferConfig, endpoint: ReceiverEndpoint) -> tuple[WriterFactory, Callable[[], None]]:
    from splitserve.kv_transfer import tcp

    if endpoint.tcp_address is None:
        raise ValueError("kv_transfer: backend 'tcp' needs a receiver with a tcp address")
    link = tcp.TcpLink(endpoint.tcp_address, config.compression, config.checksum, config.timeout_s)
    return link, link.close


def _tcp_inbox(config: KVTransferConfig, sink: PageSink | None, device: torch.device, host: str) -> Inbox:
    from splitserve.kv_transfer import tcp

    inbox = tcp.TcpInbox(host, config.timeout_s, pin_memory=device.type == "cuda")
    return Inbox(inbox, {"tcp_address": inbox.address})


def _cuda_ipc_writer(config: KVTransferConfig, endpoint: ReceiverEndpoint) -> tuple[WriterFactory, None]:
    from splitserve.kv_transfer import cuda_ipc

    return cuda_ipc.writer_factory(endpoint), None


def _cuda_ipc_inbox(config: KVTransferConfig, sink: PageSink | None, device: torch.device, host: str) -> Inbox:
    from splitserve.kv_transfer import cuda_ipc

    return Inbox(cuda_ipc.RECEIVE, {"ipc_handle": cuda_ipc.export_kv_cache(sink.kv_cache)})  # type: ignore[union-attr]


def _nccl_writer(config: KVTransferConfig, endpoint: ReceiverEndpoint) -> tuple[WriterFactory, None]:
    from splitserve.kv_transfer import nccl

    return nccl.writer_factory(endpoint), None


def _nccl_inbox(config: KVTransferConfig, sink: PageSink | None, device: torch.device, host: str) -> Inbox:
    from splitserve.kv_transfer import nccl

    inbox = nccl.NcclInbox(device, host, config.timeout_s)
    return Inbox(inbox, {"nccl_store": inbox.store_address})


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _everywhere(device: torch.device) -> bool:
    return True


register_backend(Backend("local", _everywhere, writer=None))
register_backend(Backend("grpc", _everywhere, writer=_grpc_writer))
register_backend(Backend("tcp", _everywhere, writer=_tcp_writer, inbox=_tcp_inbox))
register_backend(Backend("cuda_ipc", _on_cuda, writer=_cuda_ipc_writer, inbox=_cuda_ipc_inbox))
register_backend(
    Backend("nccl", lambda device: _on_cuda(device) and nccl_available(), writer=_nccl_writer, inbox=_nccl_inbox)
)
