"""The connector boundary between the engine and a transport: what a transfer is, and the two sides' APIs.

Lifetimes (the contract every backend keeps):
- the sender's source pages passed to ``send_layer`` must stay valid until ``finish()`` or ``abort()`` returns;
- the receiver's destination pages stay reserved until the expectation's future is done: by then the sender has
  stopped writing (success, abort or failure alike).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from splitserve.engine.page_copy import Blocks
from splitserve.kv_transfer.head_map import HeadLink
from splitserve.kv_transfer.peer import PeerInfo


@dataclass(frozen=True)
class TransferSpec:
    """One request's KV, or between workers of several TP ranks one link's share of it (``link``): both sides build
    it independently and the receiver checks the sender's copy."""

    request_id: str
    num_layers: int
    num_tokens: int
    dst_block_ids: list[int]
    page_shape: tuple[int, ...]  # one block of one layer as sent: (2, block_size, kv_heads carried, head_dim)
    dtype: str  # torch dtype name without the "torch." prefix
    checksum: bool = False
    link: HeadLink | None = None  # which KV heads, from which prefill rank to which decode rank; None: single ranks

    def __post_init__(self) -> None:
        if self.link is not None and len(self.link.heads) != self.page_shape[2]:
            raise ValueError(
                f"page_shape: {tuple(self.page_shape)} holds {self.page_shape[2]} KV heads, but the link carries "
                f"{len(self.link.heads)} ({self.link})"
            )

    @property
    def head_link(self) -> HeadLink:
        """The link, where None means every head of a single-rank worker's pages."""
        return self.link if self.link is not None else HeadLink.whole(self.page_shape[2])

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """Shape of one layer's pages as sent: [2, n_blocks, block_size, kv_heads, head_dim]."""
        return (self.page_shape[0], len(self.dst_block_ids), *self.page_shape[1:])

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype: {self.dtype!r} is not a torch dtype")
        return dtype

    @property
    def layer_bytes(self) -> int:
        return torch.Size(self.layer_shape).numel() * self.torch_dtype.itemsize

    def to_wire(self) -> dict:
        return {
            "request_id": self.request_id,
            "num_layers": self.num_layers,
            "num_tokens": self.num_tokens,
            "dst_block_ids": list(self.dst_block_ids),
            "page_shape": list(self.page_shape),
            "dtype": self.dtype,
            "checksum": self.checksum,
            "link": None if self.link is None else self.link.to_wire(),
        }

    @classmethod
    def from_wire(cls, d: dict) -> TransferSpec:
        return cls(
            request_id=d["request_id"],
            num_layers=d["num_layers"],
            num_tokens=d["num_tokens"],
            dst_block_ids=list(d["dst_block_ids"]),
            page_shape=tuple(d["page_shape"]),
            dtype=d["dtype"],
            checksum=d["checksum"],
            link=None if d.get("link") is None else HeadLink.from_wire(d["link"]),
        )

    def same_layout(self, other: TransferSpec) -> bool:
        """Whether a sender's spec writes exactly the pages this receiver reserved."""
        return (
            self.num_layers == other.num_layers
            and list(self.dst_block_ids) == list(other.dst_block_ids)
            and tuple(self.page_shape) == tuple(other.page_shape)
            and self.dtype == other.dtype
            and self.head_link == other.head_link
        )

    def describe_layout(self) -> str:
        """The layout ``same_layout`` compares, for an error that names both ends'."""
        blocks = ", ".join(map(str, self.dst_block_ids[:4])) + (", ..." if len(self.dst_block_ids) > 4 else "")
        return (
            f"{self.head_link}; {self.num_layers} layers of {len(self.dst_block_ids)} blocks [{blocks}] of "
            f"{tuple(self.page_shape)} {self.dtype}"
        )


@dataclass(frozen=True)
class ReceiverEndpoint:
    """How a prefill worker reaches one decode worker's receiver: plain data, picklable and hashable."""

    receiver_id: str  # key of the receiver in its process (the local backend)
    hostname: str
    pid: int
    device: str  # "cpu" or "cuda"
    address: str | None = None  # "host:port" of the receiver's gRPC server (data for grpc, control for the rest)
    gpu_uuid: str | None = None  # physical GPU of the KV cache: indices differ per process under Ray
    ipc_handle: bytes | None = None  # msgpack of the exported KV cache tensor (cuda_ipc)
    nccl_store: str | None = None  # "host:port" of the TCPStore for per-pair NCCL groups
    tcp_address: str | None = None  # "host:port" where the tcp backend's layer frames go
    backends: tuple[str, ...] = field(default_factory=tuple)  # what this receiver accepts
    # A decode worker of several TP ranks publishes one endpoint per rank: this one is rank 0's, ``ranks`` the
    # others' in rank order (head_map.py says which of them each prefill rank sends to).
    ranks: tuple[ReceiverEndpoint, ...] = ()

    @property
    def by_rank(self) -> tuple[ReceiverEndpoint, ...]:
        """Every rank's endpoint, rank 0's first: one for a single-rank worker."""
        return (self, *self.ranks)

    def in_process(self, here: PeerInfo) -> bool:
        """Whether the receiver lives in the process ``here`` describes."""
        return self.hostname == here.hostname and self.pid == here.pid


@dataclass(frozen=True)
class TransferResult:
    """What a completed transfer reports on either side."""

    request_id: str
    bytes: int  # payload bytes moved (after compression, if any)
    seconds: float
    backend: str


class PageSink(Protocol):
    """Where received pages go: ``ModelRunner`` is one."""

    def block_index(self, block_ids: list[int]) -> Blocks:
        """The ids as a selector of the sink's blocks (``page_copy.select_blocks``), built once per transfer."""

    def scatter_layers(
        self, first: int, block_ids: list[int] | Blocks, pages: torch.Tensor, heads: slice | None = None
    ) -> None:
        """Write ``pages`` [layers, 2, n, block, heads, dim] into the blocks of layers ``first`` onwards; into KV heads
        ``heads`` of the sink's pages only, if given (a link of a transfer between TP degrees).

        One call for a whole run of layers: a receiver thread that lands layer by layer pays a round of the GIL per
        op against an engine thread that holds it most of the time."""


class SendHandle(Protocol):
    """One in-flight transfer on the sending side."""

    def send_layer(self, layer: int, pages: torch.Tensor) -> None:
        """Queue one layer's pages ([2, n, block_size, H, D]); never raises for transport failures: finish() does."""

    def finish(self) -> int:
        """Wait for delivery; return the payload bytes sent, or raise a TransferError subclass."""

    def abort(self, reason: str) -> None:
        """Tell the receiver to drop the transfer; returns once the sender has stopped sending. Never raises."""


class Sender(Protocol):
    backend: str  # the backend this sender moves pages with (what ``auto`` chose)

    def begin(self, spec: TransferSpec) -> SendHandle: ...

    def close(self) -> None: ...


class Receiver(Protocol):
    """The decode worker's side of every backend at once: one per KV cache."""

    endpoint: ReceiverEndpoint  # what a sender needs to reach it; read-only once built

    def expect(self, spec: TransferSpec, sink: PageSink | None = None) -> Future[TransferResult]:
        """Register a transfer before its sender starts; the future fails with a TransferError subclass."""

    def expect_links(self, specs: list[TransferSpec], sink: PageSink | None = None) -> Future[TransferResult]:
        """Register a request's transfers from several prefill ranks, one spec per link this rank receives
        (``head_map.links_to``): the future is done once every link landed, and fails, aborting the other links,
        as soon as one fails. ``abort`` and ``unwritten`` take the request id and cover every link."""

    def abort(self, request_id: str, reason: str = "aborted by the receiver") -> bool:
        """Drop an expectation: its later data is discarded and its sender is told it was aborted. True if it was
        pending. Its pages may be reused only once ``unwritten`` is done."""

    def unwritten(self, request_id: str) -> Future[None]:
        """Done once no sender can still write into the request's reserved pages: at once, except while a sender
        that writes them itself (cuda_ipc) has not yet confirmed that it stopped."""

    @property
    def pending(self) -> int:
        """Expectations not yet done (reserved pages a transfer may still write)."""

    def close(self) -> None:
        """Stop accepting: pending expectations fail with PeerUnavailable, in-flight senders see the peer go."""
