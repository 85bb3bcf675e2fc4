"""The nccl backend: pages go GPU to GPU through a per-pair NCCL communicator; gRPC carries BEGIN and END only.

Each (sender process, receiver) pair gets its own ``ProcessGroupNCCL`` of two ranks (sender 0, receiver 1),
rendezvoused through a TCPStore the receiver hosts, so no global default group is needed. The communicator is
built eagerly, before any transfer (NCCL would otherwise initialise it inside the first send, which waits for the
receiver): the sender announces the pair in the store, the receiver's watcher thread joins it, and both exchange
one warm-up element.

NCCL has no tags: a pair's sends match its receives in issue order. So each transfer takes a sequence number on
its pair when it begins; the sender issues the sends of transfer k only after every send of transfer k-1 (later
transfers queue theirs meanwhile), and the receiver, at each BEGIN, posts all of that transfer's receives at once,
strictly in sequence order. Layers travel in a few chunks (``chunk_bounds``), and no message travels per chunk: the
layer hook copies each layer into its chunk and enqueues the chunk's send once it is full (on the pair's stream,
after an event marking it ready), and the receiver lands every layer under one lock when END arrives and its
receives are done. Every announced chunk must be sent, so a transfer that ends early (finish or abort) pads its
missing chunks, and the receiver drains an aborted transfer instead of cutting it off (``AbortMode.DRAIN``). A pair that
loses step (a BEGIN that never came, receives that never completed) is dropped on both sides, and the next
transfer builds a new one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve import handoff_trace
from splitserve.kv_transfer.base import ReceiverEndpoint, TransferSpec
from splitserve.kv_transfer.errors import IntegrityError, PeerUnavailable, TransferError, TransferTimeout
from splitserve.kv_transfer.expectations import Expectation
from splitserve.kv_transfer.grpc_server import AbortMode, OutOfBand
from splitserve.kv_transfer.stream_sender import LayerWriter
from splitserve.netaddr import join_host_port, split_host_port

log = logging.getLogger(__name__)
_SENDER, _RECEIVER = 0, 1
_RENDEZVOUS_TIMEOUT = timedelta(seconds=60)
_PAIRS = "kv/pairs"  # counter of announced pairs; pair i's name is at kv/pair/i
_WATCH_POLL = timedelta(hours=1)  # long: c10d logs a warning at every timed-out wait
_POLL_S = 50e-6
# Layers travel in this many sends per transfer. Each pending NCCL operation takes a slot in the communicator's work
# queue, and a queue filled by receives posted ahead of their sends blocks the next post on the host: one send per
# layer (32 for an 8B model) stalled receivers by whole prefill passes once a few transfers were in flight. With 4,
# only the last quarter of a transfer is left to move after the prefill's last layer.
_CHUNKS = 4


def chunk_bounds(num_layers: int) -> list[tuple[int, int]]:
    """The [first, last) layers of each send: both sides derive them from the spec."""
    size = -(-num_layers // min(_CHUNKS, num_layers))
    return [(first, min(first + size, num_layers)) for first in range(0, num_layers, size)]


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


def _drop_group(group: dist.ProcessGroupNCCL) -> None:
    """Abort a communicator that lost step: its pending sends/receives end instead of spinning forever."""
    abort = getattr(group, "abort", None)
    if abort is None:
        return
    try:
        abort()
    except Exception:
        log.exception("nccl: aborting a dropped pair")


def _wait_event(event: torch.cuda.Event, timeout_s: float) -> bool:
    """Poll rather than synchronize, so a wedged peer costs a timeout, not a thread."""
    deadline = time.monotonic() + timeout_s
    while not event.query():
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


@dataclass
class _Received:
    """One transfer's posted receives: the staging buffer (all layers) and the event of their completion."""

    pair: str
    staging: torch.Tensor  # [num_layers, *layer_shape], allocated on the pair's stream
    done: torch.cuda.Event


@dataclass
class _InPair:
    group: dist.ProcessGroupNCCL
    stream: torch.cuda.Stream  # receives only: a wedged pair must not hold up the others
    next_seq: int = 0


class NcclInbox(OutOfBand):
    """Receiver side: the TCPStore, one group per sender pair (joined by a watcher thread), in-order receives."""

    on_receiver_abort = AbortMode.DRAIN

    def __init__(self, device: torch.device, host: str, timeout_s: float):
        # An index is needed to pin the watcher thread's device ("cuda" alone means the current one: resolve it).
        self._device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self._timeout_s = timeout_s
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=_RENDEZVOUS_TIMEOUT)
        self.store_address = join_host_port(host, self._store.port)
        self._pairs: dict[str, _InPair] = {}
        self._lost: set[str] = set()
        self._turn = threading.Condition()
        # Scatters go on their own stream: on a pair's stream they would queue behind the receives of the transfers
        # begun since, which complete only when those prompts' prefill is done.
        self._land_stream = torch.cuda.Stream(self._device)
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
                    self._pairs[pair] = _InPair(group, torch.cuda.Stream(self._device))
                    self._turn.notify_all()
            index += 1

    def open(self, spec: TransferSpec, begin: dict) -> _Received:
        """Post every chunk's receive in the pair's sequence order, whether or not the transfer will be claimed."""
        name, seq = begin.get("pair"), begin.get("seq")
        if not isinstance(name, str) or not isinstance(seq, int):
            raise IntegrityError("nccl: BEGIN without its pair name and sequence number")
        with self._turn:
            # The sender built its side before its first transfer, so the watcher is at most a moment behind; the
            # previous transfer's BEGIN travels on another stream and may be a moment late too.
            ready = self._turn.wait_for(
                lambda: name in self._lost or (name in self._pairs and self._pairs[name].next_seq >= seq),
                self._timeout_s,
            )
            if name in self._lost:
                raise PeerUnavailable(f"nccl: pair {name} was dropped; the sender builds a new one")
            if not ready:
                self._lose(name, f"transfer {seq} of pair {name}: the earlier ones never began")
                raise TransferTimeout(f"nccl: pair {name} lost step waiting for transfer {seq - 1}")
            pair = self._pairs[name]
            if pair.next_seq != seq:
                self._lose(name, f"transfer {seq} of pair {name} began twice")
                raise TransferError(f"nccl: pair {name} lost step at transfer {seq}")
            with torch.cuda.stream(pair.stream):
                staging = torch.empty((spec.num_layers, *spec.layer_shape), dtype=spec.torch_dtype, device=self._device)
                for first, last in chunk_bounds(spec.num_layers):
                    # wait() orders the pair's stream after NCCL's; it does not block this thread.
                    pair.group.recv([staging[first:last]], _SENDER, 0).wait()  # type: ignore[attr-defined]
                done = torch.cuda.Event()
                done.record(pair.stream)
            pair.next_seq = seq + 1
            self._turn.notify_all()
        return _Received(name, staging, done)

    def close(self, exp: Expectation, opened: object, end: dict) -> None:
        """At END: once the receives are done, scatter the layers sent for real (none if the transfer was aborted;
        the padding after a short transfer is dropped, and completing then names the missing layers)."""
        assert isinstance(opened, _Received)
        sent = end.get("layers")
        if not isinstance(sent, int) or not 0 <= sent <= exp.spec.num_layers:
            raise IntegrityError(f"{exp.spec.request_id}: END says {sent!r} layers were sent")
        if not _wait_event(opened.done, self._timeout_s):
            with self._turn:
                self._lose(opened.pair, f"{exp.spec.request_id}: receives not done after {self._timeout_s:g} s")
            raise TransferTimeout(f"{exp.spec.request_id}: the sender's pages never arrived")
        request_id = exp.spec.request_id
        handoff_trace.mark("receiver.pages_in", request_id)

        def settle() -> None:
            handoff_trace.mark("receiver.land_issued", request_id)
            self._land_stream.synchronize()

        with torch.cuda.stream(self._land_stream):
            exp.land_layers(0, opened.staging[:sent], exp.spec.layer_bytes, settle=settle)
        handoff_trace.mark("receiver.landed", request_id)

    def _lose(self, name: str, why: str) -> None:
        """Drop a pair (caller holds the lock): its later transfers fail at once and the sender builds a new one."""
        log.warning("nccl: dropping pair %s: %s", name, why)
        self._lost.add(name)
        pair = self._pairs.pop(name, None)
        if pair is not None:
            _drop_group(pair.group)
        self._turn.notify_all()


class _Pair:
    """Sender side of one pair: the group, and the queue that issues transfers' layers in sequence order."""

    def __init__(self, endpoint: ReceiverEndpoint, device: torch.device):
        assert endpoint.nccl_store is not None
        host, port = split_host_port(endpoint.nccl_store)
        self.name = uuid.uuid4().hex
        store = dist.TCPStore(host, port, is_master=False, timeout=_RENDEZVOUS_TIMEOUT)
        index = store.add(_PAIRS, 1) - 1
        store.set(f"kv/pair/{index}", self.name)
        self.device = device
        self.group = _pair_group(store, self.name, _SENDER, device)
        self.stream = torch.cuda.Stream(device)
        self.broken = False
        self._lock = threading.Lock()
        self._next_seq = 0
        self._waiting: deque[NcclWriter] = deque()  # transfers begun but not fully issued, oldest first

    def enlist(self, writer: NcclWriter) -> int:
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._waiting.append(writer)
            return seq

    def submit(self, writer: NcclWriter, chunk: torch.Tensor) -> bool:
        """On the engine's thread: issue the chunk now if its transfer is the oldest unfinished one, else queue it."""
        ready = torch.cuda.Event()
        ready.record()  # on the engine's stream, right after the chunk's last layer was copied in
        chunk.record_stream(self.stream)  # the allocator must not reuse it before the send has read it
        with self._lock:
            if writer.sealed:
                return False  # finish or abort came first and padded this chunk
            writer.queued.append((chunk, ready))
            self._flush()
            return True

    def seal(self, writer: NcclWriter) -> None:
        """No more layers come: send a throwaway chunk for each one not sent, since the receiver posted them all."""
        with self._lock:
            if writer.sealed:
                return
            writer.sealed = True
            for first, last in writer.bounds[writer.issued + len(writer.queued) :]:
                shape = (last - first, *writer.spec.layer_shape)
                with torch.cuda.stream(self.stream):
                    filler = torch.empty(shape, dtype=writer.spec.torch_dtype, device=self.device)
                writer.queued.append((filler, None))
            self._flush()

    def _flush(self) -> None:
        while self._waiting:
            head = self._waiting[0]
            while head.queued:
                self._issue(*head.queued.popleft())
                head.issued += 1
            if head.issued < len(head.bounds):
                return
            self._waiting.popleft()

    def _issue(self, pages: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        with torch.cuda.stream(self.stream):
            # On the engine's stream the send would wait for everything queued there since (the next layers,
            # the next prompts); on the pair's stream it waits for this chunk only.
            if ready is not None:
                self.stream.wait_event(ready)
            self.group.send([pages], _RECEIVER, 0).wait()  # type: ignore[attr-defined]  # missing from the stubs


class NcclWriter(LayerWriter):
    """One transfer on a pair; nothing goes on the gRPC stream per layer."""

    transport = "nccl"

    def __init__(self, pair: _Pair, spec: TransferSpec):
        self.spec = spec
        self.bounds = chunk_bounds(spec.num_layers)
        self._pair = pair
        self.queued: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()  # guarded by the pair's lock
        self.issued = 0  # chunks sent
        self.sealed = False
        self._next_layer = 0
        self._chunk: torch.Tensor | None = None  # the chunk being filled, on the engine's stream
        self._shipped = 0  # layers in chunks handed over for real; what follows is padding
        self.seq = pair.enlist(self)

    def begin_fields(self) -> dict:
        return {"pair": self._pair.name, "seq": self.seq, "checksum": False}

    def prepare(self, layer: int, pages: torch.Tensor) -> None:
        """From the layer hook, on the engine's thread: copy the layer into its chunk, and enqueue the chunk's send
        here (not on gRPC's thread) once its last layer is in."""
        if layer != self._next_layer:
            raise ValueError(f"nccl: layer {layer} sent after {self._next_layer} layers (layers go in order)")
        self._next_layer += 1
        first, last = next((f, t) for f, t in self.bounds if f <= layer < t)
        if layer == first:
            self._chunk = torch.empty((last - first, *pages.shape), dtype=pages.dtype, device=pages.device)
        assert self._chunk is not None
        self._chunk[layer - first].copy_(pages)
        if layer == last - 1:
            if self._pair.submit(self, self._chunk):
                self._shipped = last
            self._chunk = None

    def seal(self) -> None:
        self._pair.seal(self)

    def end_fields(self) -> dict:
        return {"layers": self._shipped}

    def lost(self) -> None:
        """The receiver is gone or dropped the pair: it may be out of step, so the next transfer builds a new one."""
        self._pair.broken = True


def writer_factory(endpoint: ReceiverEndpoint) -> Callable[[TransferSpec], NcclWriter]:
    if endpoint.nccl_store is None:
        raise ValueError("nccl: the receiver offers no NCCL rendezvous")
    device = torch.device("cuda", torch.cuda.current_device())
    pairs: list[_Pair] = []
    lock = threading.Lock()

    def writer(spec: TransferSpec) -> NcclWriter:
        with lock:
            if not pairs or pairs[-1].broken:
                if pairs:
                    _drop_group(pairs[-1].group)
                pairs[:] = [_Pair(endpoint, device)]
            return NcclWriter(pairs[-1], spec)

    return writer
