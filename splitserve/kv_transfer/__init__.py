"""KV cache transfer from prefill to decode workers: one interface (base.py), four backends (local, grpc,
cuda_ipc, nccl), built by ``make_sender``/``make_receiver``. See docs/kv_transfer.md."""

from splitserve.kv_transfer.auto import choose_backend
from splitserve.kv_transfer.base import (
    PageSink,
    Receiver,
    ReceiverEndpoint,
    Sender,
    SendHandle,
    TransferResult,
    TransferSpec,
)
from splitserve.kv_transfer.errors import (
    IntegrityError,
    PeerUnavailable,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from splitserve.kv_transfer.factory import make_receiver, make_sender
from splitserve.kv_transfer.receiver import KVReceiver

__all__ = [
    "IntegrityError",
    "KVReceiver",
    "PageSink",
    "PeerUnavailable",
    "Receiver",
    "ReceiverEndpoint",
    "SendHandle",
    "Sender",
    "TransferAborted",
    "TransferError",
    "TransferResult",
    "TransferSpec",
    "TransferTimeout",
    "choose_backend",
    "make_receiver",
    "make_sender",
]
