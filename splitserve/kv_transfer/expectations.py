"""The receiver's table of reserved transfers, shared by every backend that lands pages in this process.

A transfer goes: expected -> claimed (a sender started) -> done. ``abort`` can strike in any state; aborted ids are
remembered for a while so a sender that shows up later is told "aborted", not "unknown".
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import torch

from splitserve.engine.page_copy import Blocks
from splitserve.kv_transfer.base import PageSink, TransferResult, TransferSpec
from splitserve.kv_transfer.errors import IntegrityError, TransferAborted, TransferError

_TOMBSTONES = 4096


class Expectation:
    """One reserved transfer: where its pages go, which layers landed, and the future the decode worker waits on."""

    def __init__(self, spec: TransferSpec, sink: PageSink):
        self.spec = spec
        self.sink = sink
        self.future: Future[TransferResult] = Future()
        self.started = time.perf_counter()
        self.landed: set[int] = set()
        self.bytes = 0
        self._blocks: Blocks | None = None  # dst_block_ids as the sink selects them, built at the first landing
        self._lock = threading.Lock()
        self._on_abort: list[Callable[[str], None]] = []
        self._holds = 0  # senders that may be writing into the pages themselves (cuda_ipc)
        self._holds_lock = threading.Lock()  # not _lock: the future's callbacks run under that one
        self.unwritten: Future[None] = Future()  # done once the transfer is over and no sender can write any more
        self.future.add_done_callback(lambda _: self._settle())

    @property
    def done(self) -> bool:
        return self.future.done()

    def on_abort(self, callback: Callable[[str], None]) -> None:
        """Called (from the aborting thread) when the receiver aborts: lets a transport tell its sender at once."""
        with self._lock:
            self._on_abort.append(callback)

    def hold_pages(self) -> None:
        """A sender that writes into the pages itself is under way: ``unwritten`` waits for its release."""
        with self._holds_lock:
            self._holds += 1

    def release_pages(self) -> None:
        with self._holds_lock:
            self._holds -= 1
        self._settle()

    def _settle(self) -> None:
        with self._holds_lock:
            free = self.future.done() and self._holds == 0 and not self.unwritten.done()
            if free:
                self.unwritten.set_result(None)

    def land_layer(self, layer: int, pages: torch.Tensor, wire_bytes: int) -> None:
        """Scatter one layer into the reserved pages (dropped silently once the transfer is over)."""
        self.land_layers(layer, pages.unsqueeze(0), wire_bytes)

    def land_layers(
        self, first: int, pages: torch.Tensor, wire_bytes_each: int, settle: Callable[[], None] | None = None
    ) -> None:
        """Scatter the run of layers ``pages`` [layers, ...] from ``first`` on, in one copy under one hold of the
        lock; ``settle`` (e.g. a stream sync) runs before it is let go, so once abort() returns no page is written,
        not even by device work still queued."""
        count = pages.shape[0]
        if not (first >= 0 and first + count <= self.spec.num_layers):
            raise IntegrityError(f"{self.spec.request_id}: layers {first}..{first + count - 1} out of range")
        shape = tuple(pages.shape[1:])
        if shape != self.spec.layer_shape:
            raise IntegrityError(
                f"{self.spec.request_id}: layer {first} pages {shape}, expected {self.spec.layer_shape}"
            )
        with self._lock:
            if self.future.done():
                return
            if self._blocks is None:
                self._blocks = self.sink.block_index(self.spec.dst_block_ids)
            if count:
                self.sink.scatter_layers(first, self._blocks, pages)
            self.landed.update(range(first, first + count))
            self.bytes += wire_bytes_each * count
            if settle is not None:
                settle()

    def mark_written(self, layer: int, wire_bytes: int) -> None:
        """A layer the sender wrote into our pages itself (cuda_ipc)."""
        with self._lock:
            self.landed.add(layer)
            self.bytes += wire_bytes

    def complete(self, backend: str) -> TransferResult:
        missing = sorted(set(range(self.spec.num_layers)) - self.landed)
        if missing:
            err = IntegrityError(f"{self.spec.request_id}: transfer ended without layers {missing[:8]}")
            self.fail(err)
            raise err
        result = TransferResult(self.spec.request_id, self.bytes, time.perf_counter() - self.started, backend)
        with self._lock:
            if not self.future.done():
                self.future.set_result(result)
        return result

    def fail(self, err: TransferError) -> bool:
        with self._lock:
            if self.future.done():
                return False
            self.future.set_exception(err)
        return True

    def abort(self, reason: str) -> bool:
        """The receiver's own abort: fail the future, then let the transport tell the sender."""
        if not self.fail(TransferAborted(f"{self.spec.request_id}: {reason}")):
            return False
        with self._lock:
            callbacks = list(self._on_abort)
        for callback in callbacks:
            callback(reason)
        return True


class ExpectationTable:
    def __init__(self, default_sink: PageSink | None):
        self._default_sink = default_sink
        self._pending: dict[str, Expectation] = {}
        self._aborted: OrderedDict[str, str] = OrderedDict()
        self._writing: dict[str, Expectation] = {}  # done, but a sender may still write their pages
        self._lock = threading.Lock()

    def expect(self, spec: TransferSpec, sink: PageSink | None = None) -> Expectation:
        sink = sink or self._default_sink
        if sink is None:
            raise ValueError("expect: no sink given and the receiver has no default sink")
        exp = Expectation(spec, sink)
        with self._lock:
            if spec.request_id in self._pending:
                raise ValueError(f"request_id: {spec.request_id!r} is already expected")
            self._aborted.pop(spec.request_id, None)
            self._pending[spec.request_id] = exp
        exp.future.add_done_callback(lambda _: self._forget(spec.request_id, exp))
        return exp

    def claim(self, sent: TransferSpec) -> Expectation:
        """The expectation a starting sender fills; raises TransferAborted/TransferError when there is none."""
        with self._lock:
            reason = self._aborted.get(sent.request_id)
            exp = self._pending.get(sent.request_id)
        if reason is not None:
            raise TransferAborted(f"{sent.request_id}: {reason}")
        if exp is None:
            raise TransferError(f"{sent.request_id}: no transfer expected (reserve pages first)")
        if not exp.spec.same_layout(sent):
            err = IntegrityError(f"{sent.request_id}: sender's layout does not match the reserved pages")
            exp.fail(err)
            raise err
        return exp

    def unwritten(self, request_id: str) -> Future[None]:
        """Done once no sender can write into the request's reserved pages: free them only then."""
        with self._lock:
            exp = self._pending.get(request_id) or self._writing.get(request_id)
        if exp is not None:
            return exp.unwritten
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def abort(self, request_id: str, reason: str) -> bool:
        with self._lock:
            exp = self._pending.get(request_id)
            self._aborted[request_id] = reason
            while len(self._aborted) > _TOMBSTONES:
                self._aborted.popitem(last=False)
        return exp is not None and exp.abort(reason)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def fail_all(self, err: TransferError) -> None:
        with self._lock:
            pending = list(self._pending.values())
        for exp in pending:
            exp.fail(err)

    def _forget(self, request_id: str, exp: Expectation) -> None:
        """Done: no longer expected, but still tracked while a sender may be writing its pages."""
        with self._lock:
            if self._pending.get(request_id) is exp:
                del self._pending[request_id]
            if exp.unwritten.done():
                return
            self._writing[request_id] = exp
        exp.unwritten.add_done_callback(lambda _: self._unwritten(request_id, exp))

    def _unwritten(self, request_id: str, exp: Expectation) -> None:
        with self._lock:
            if self._writing.get(request_id) is exp:
                del self._writing[request_id]
