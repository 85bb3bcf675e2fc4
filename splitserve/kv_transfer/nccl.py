"""The nccl backend: pages go GPU to GPU through a per-pair NCCL communicator; gRPC carries the control messages.

Each (sender process, receiver) pair gets its own ``ProcessGroupNCCL`` of two ranks (sender 0, receiver 1),
rendezvoused through a TCPStore the receiver hosts, so no global default group is needed. The communicator is
built eagerly, before any transfer: NCCL initialises it collectively inside the first send/recv, so a sender whose
first send waits for a receiver that waits for that send's LAYER marker would deadlock. The sender announces the
pair in the store; the receiver's watcher thread joins it and both exchange one warm-up element. The sender issues one
send per layer of the coalesced pages and then a LAYER marker carrying a per-pair sequence number; the receiver
posts the matching recv into a staging buffer strictly in sequence order (NCCL has no tags, and markers of
concurrent transfers arrive on different streams), then scatters. An announced send must always be matched, so
the receiver drains aborted transfers instead of cutting them off (``OutOfBand.drains``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve.kv_transfer import wire
from splitserve.kv_transfer.base import ReceiverEndpoint, TransferSpec
from splitserve.kv_transfer.errors import TransferError
from splitserve.kv_transfer.expectations import Expectation
from splitserve.kv_transfer.grpc_server import OutOfBand
from splitserve.netaddr import join_host_port, split_host_port

log = logging.getLogger(__name__)
_SENDER, _RECEIVER = 0, 1
_RENDEZVOUS_TIMEOUT = timedelta(seconds=60)
_PAIRS = "kv/pairs"  # counter of announced pairs; pair i's name is at kv/pair/i
_WATCH_POLL = timedelta(hours=1)  # long: c10d logs a warning at every timed-out wait


def _pair_group(store: dist.Store, pair: str, rank: int, device: torch.device) -> dist.ProcessGroupNCCL:
    """The pair's group with its communicator built: both ranks must call this (it blocks until both have)."""
    torch.cuda.set_device(device)
    group = dist.ProcessGroupNCCL(dist.PrefixStore(f"kv/{pair}/", store), rank, 2, dist.ProcessGroupNCCL.Options())
    hello = torch.zeros(1, device=device)
    peer = _RECEIVER if rank == _SENDER else _SENDER
    work = group.send([hello], peer, 0) if rank == _SENDER else group.recv([hello], peer, 0)  # type: ignore[attr-defined]
    work.wait()
    torch.cuda.current_stream(device).synchronize()
    return group


class NcclInbox:
    """Receiver side: the TCPStore, one group per sender pair (joined by a watcher thread), in-order recvs."""

    def __init__(self, device: torch.device, host: str):
        # An index is needed to pin the watcher thread's device ("cuda" alone means the current one: resolve it).
        self._device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=_RENDEZVOUS_TIMEOUT)
        self.store_address = join_host_port(host, self._store.port)
        self._groups: dict[str, dist.ProcessGroupNCCL] = {}
        self._next_seq: dict[str, int] = {}
        self._turn = threading.Condition()
        # Receives and scatters run on their own stream: waiting on the default stream would wait for the decode
        # steps queued there, once per layer.
        self._stream = torch.cuda.Stream(self._device)
        self.receive = OutOfBand(land=self._land_layer, drains=True)
        # Its own client: a TCPStore client serialises its calls, and the watcher blocks in wait().
        watch_store = dist.TCPStore(host, self._store.port, is_master=False, timeout=_WATCH_POLL)
        threading.Thread(target=self._watch, args=(watch_store,), name="nccl-pairs", daemon=True).start()

    def _watch(self, store: dist.TCPStore) -> None:
        """Join each pair a sender announces, in order, for the life of the process."""
        index = 0
        while True:
            key = f"kv/pair/{index}"
            try:
                store.wait([key])
            except dist.DistStoreError:
                continue  # nothing announced yet
            pair = store.get(key).decode()
            try:
                group = _pair_group(store, pair, _RECEIVER, self._device)
            except Exception:
                log.exception("nccl: joining pair %s failed", pair)
            else:
                with self._turn:
                    self._groups[pair] = group
                    self._next_seq[pair] = 0
                    self._turn.notify_all()
            index += 1

    def _land_layer(self, exp: Expectation, header: dict, begin: dict) -> None:
        pair, seq = begin["pair"], header["seq"]
        with self._turn:
            # The sender built its side before its first send, so the watcher is at most a moment behind.
            if not self._turn.wait_for(lambda: pair in self._groups, _RENDEZVOUS_TIMEOUT.total_seconds()):
                raise TransferError(f"nccl: pair {pair} never joined")
            group = self._groups[pair]
            self._turn.wait_for(lambda: self._next_seq[pair] == seq)
            with torch.cuda.stream(self._stream):
                staging = torch.empty(exp.spec.layer_shape, dtype=exp.spec.torch_dtype, device=self._device)
                group.recv([staging], _SENDER, 0).wait()  # type: ignore[attr-defined]  # missing from the stubs
            self._next_seq[pair] = seq + 1
            self._turn.notify_all()
        with torch.cuda.stream(self._stream):
            exp.land_layer(header["layer"], staging, header["bytes"])  # dropped if the transfer was aborted
        self._stream.synchronize()  # the pages are in place (and staging is free to go) before the layer counts


class _Pair:
    """Sender side of one pair: the group and the sequence counter that orders sends across transfers."""

    def __init__(self, endpoint: ReceiverEndpoint, device: torch.device):
        assert endpoint.nccl_store is not None
        host, port = split_host_port(endpoint.nccl_store)
        self.name = uuid.uuid4().hex
        store = dist.TCPStore(host, port, is_master=False, timeout=_RENDEZVOUS_TIMEOUT)
        index = store.add(_PAIRS, 1) - 1
        store.set(f"kv/pair/{index}", self.name)
        self.group = _pair_group(store, self.name, _SENDER, device)
        self.stream = torch.cuda.Stream(device)
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
        # Wait for the sends only, on a side stream: the default stream carries the engine's next forward pass.
        with torch.cuda.stream(self._pair.stream):
            for work, _ in self._works:
                work.wait()
        self._pair.stream.synchronize()
        self._works.clear()
        return {}


def writer_factory(endpoint: ReceiverEndpoint) -> Callable[[TransferSpec], NcclWriter]:
    if endpoint.nccl_store is None:
        raise ValueError("nccl: the receiver offers no NCCL rendezvous")
    pair = _Pair(endpoint, torch.device("cuda", torch.cuda.current_device()))
    return lambda spec: NcclWriter(pair)
