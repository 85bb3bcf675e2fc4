"""The nccl backend: pages go GPU to GPU through a per-pair NCCL communicator; gRPC carries the control messages.

Each (sender process, receiver) pair gets its own ``ProcessGroupNCCL`` of two ranks (sender 0, receiver 1),
rendezvoused through a TCPStore the receiver hosts, so no global default group is needed. The sender issues one
send per layer of the coalesced pages and then a LAYER marker carrying a per-pair sequence number; the receiver
posts the matching recv into a staging buffer strictly in sequence order (NCCL has no tags, and markers of
concurrent transfers arrive on different streams), then scatters. An announced send must always be matched, so
the receiver drains aborted transfers instead of cutting them off (``OutOfBand.drains``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve.kv_transfer import wire
from splitserve.kv_transfer.base import ReceiverEndpoint, TransferSpec
from splitserve.kv_transfer.expectations import Expectation
from splitserve.kv_transfer.grpc_server import OutOfBand

_SENDER, _RECEIVER = 0, 1
_RENDEZVOUS_TIMEOUT = timedelta(seconds=60)


def _pair_group(store: dist.Store, pair: str, rank: int, device: torch.device) -> dist.ProcessGroupNCCL:
    torch.cuda.set_device(device)
    return dist.ProcessGroupNCCL(dist.PrefixStore(f"kv/{pair}/", store), rank, 2, dist.ProcessGroupNCCL.Options())


class NcclInbox:
    """Receiver side: the TCPStore, one group per sender pair, and in-order recvs per pair."""

    def __init__(self, device: torch.device, host: str):
        self._device = device
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=_RENDEZVOUS_TIMEOUT)
        self.store_address = f"{host}:{self._store.port}"
        self._groups: dict[str, dist.ProcessGroupNCCL] = {}
        self._next_seq: dict[str, int] = {}
        self._turn = threading.Condition()
        self.receive = OutOfBand(land=self._land_layer, drains=True)

    def _group(self, pair: str) -> dist.ProcessGroupNCCL:
        if pair not in self._groups:
            self._groups[pair] = _pair_group(self._store, pair, _RECEIVER, self._device)
            self._next_seq[pair] = 0
        return self._groups[pair]

    def _land_layer(self, exp: Expectation, header: dict, begin: dict) -> None:
        pair, seq = begin["pair"], header["seq"]
        with self._turn:
            group = self._group(pair)
            self._turn.wait_for(lambda: self._next_seq[pair] == seq)
            staging = torch.empty(exp.spec.layer_shape, dtype=exp.spec.torch_dtype, device=self._device)
            group.recv([staging], _SENDER, 0).wait()  # type: ignore[attr-defined]  # missing from the stubs
            self._next_seq[pair] = seq + 1
            self._turn.notify_all()
        torch.cuda.current_stream(self._device).synchronize()
        exp.land_layer(header["layer"], staging, header["bytes"])  # dropped if the transfer was aborted


class _Pair:
    """Sender side of one pair: the group and the sequence counter that orders sends across transfers."""

    def __init__(self, endpoint: ReceiverEndpoint, device: torch.device):
        assert endpoint.nccl_store is not None
        host, port = endpoint.nccl_store.rsplit(":", 1)
        self.name = uuid.uuid4().hex
        store = dist.TCPStore(host, int(port), is_master=False, timeout=_RENDEZVOUS_TIMEOUT)
        self.group = _pair_group(store, self.name, _SENDER, device)
        self.lock = threading.Lock()
        self.seq = 0


class NcclWriter:
    transport = "nccl"

    def __init__(self, pair: _Pair):
        self._pair = pair
        self._works: list[tuple[dist.Work, torch.Tensor]] = []

    def begin_fields(self) -> dict:
        return {"pair": self._pair.name, "checksum": False}

    def prepare(self, pages: torch.Tensor) -> torch.Tensor:
        return pages.contiguous()

    def messages(self, layer: int, prepared: object) -> Iterator[bytes]:
        assert isinstance(prepared, torch.Tensor)
        with self._pair.lock:  # the sequence number and the send must be issued together
            seq = self._pair.seq
            self._pair.seq += 1
            work = self._pair.group.send([prepared], _RECEIVER, 0)  # type: ignore[attr-defined]
        self._works.append((work, prepared))  # keep the tensor alive until the send is done
        yield wire.pack(
            {"kind": wire.LAYER, "layer": layer, "seq": seq, "bytes": prepared.numel() * prepared.element_size()}
        )

    def end_fields(self) -> dict:
        for work, _ in self._works:
            work.wait()
        torch.cuda.current_stream().synchronize()
        self._works.clear()
        return {}


def writer_factory(endpoint: ReceiverEndpoint) -> Callable[[TransferSpec], NcclWriter]:
    if endpoint.nccl_store is None:
        raise ValueError("nccl: the receiver offers no NCCL rendezvous")
    pair = _Pair(endpoint, torch.device("cuda", torch.cuda.current_device()))
    return lambda spec: NcclWriter(pair)
