"""The receiver's table of reserved transfers, shared by every backend that lands pages in this process.

A transfer goes: expected -> claimed (a sender started) -> done. ``abort`` can strike in any state; aborted ids are
remembered for a while so a sender that shows up later is told "aborted", not "unknown". A request expects one
transfer per link (kv_transfer/head_map.py): one between single-rank workers, one per prefill rank that sends this
rank some of its KV heads otherwise; it is done once every link has landed.
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
        self._heads = spec.head_link.dst_slice  # where the link's heads go in the sink's pages (None: all of them)
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
            if count and self._heads is None:
                self.sink.scatter_layers(first, self._blocks, pages)
            elif count:
                self.sink.scatter_layers(first, self._blocks, pages, heads=self._heads)
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


class RequestTransfers:
    """A request's expected transfers on this receiver, one per incoming link: done once every link has landed. A
    link that fails fails the request, and the other links are aborted (their senders are told), since the request
    can no longer be admitted."""

    def __init__(self, links: list[Expectation]):
        self.links = links
        self.request_id = links[0].spec.request_id
        self.future: Future[TransferResult] = Future()
        self.unwritten: Future[None] = Future()  # done once no sender can write any of the links' pages
        self._lock = threading.Lock()
        self._ended = False
        for exp in links:
            exp.future.add_done_callback(self._link_done)
            exp.unwritten.add_done_callback(self._link_unwritten)

    def link_for(self, sent: TransferSpec) -> Expectation | None:
        """The link a sender's spec fills: the one carrying the same heads between the same ranks."""
        return next((exp for exp in self.links if exp.spec.head_link == sent.head_link), None)

    def describe_layout(self) -> str:
        return " | ".join(exp.spec.describe_layout() for exp in self.links)

    def fail(self, err: TransferError) -> bool:
        """Fail the request and abort every link still under way; False if it was over already."""
        with self._lock:
            if self._ended:
                return False
            self._ended = True
        self.future.set_exception(err)
        for exp in self.links:
            # Not the failed link: this may run in its future's callback, under its lock.
            if not exp.done:
                exp.abort(f"the request's transfer failed: {err}")
        return True

    def abort(self, reason: str) -> bool:
        aborted = [exp.abort(reason) for exp in self.links]
        return any(aborted)

    def _link_done(self, done: Future[TransferResult]) -> None:
        err = TransferAborted("cancelled") if done.cancelled() else done.exception()
        if err is not None:
            self.fail(err if isinstance(err, TransferError) else TransferError(repr(err)))
            return
        if not all(exp.future.done() and not exp.future.exception() for exp in self.links):
            return
        with self._lock:
            if self._ended:
                return
            self._ended = True
        results = [exp.future.result() for exp in self.links]
        backends = sorted({r.backend for r in results})
        self.future.set_result(
            TransferResult(
                self.request_id,
                sum(r.bytes for r in results),
                max(r.seconds for r in results),
                "+".join(backends),
            )
        )

    def _link_unwritten(self, _: Future[None]) -> None:
        with self._lock:
            settled = all(exp.unwritten.done() for exp in self.links) and not self.unwritten.done()
            if settled:
                self.unwritten.set_result(None)


class ExpectationTable:
    def __init__(self, default_sink: PageSink | None):
        self._default_sink = default_sink
        self._pending: dict[str, RequestTransfers] = {}
        self._aborted: OrderedDict[str, str] = OrderedDict()
        self._writing: dict[str, RequestTransfers] = {}  # done, but a sender may still write their pages
        self._lock = threading.Lock()

    def expect(self, specs: list[TransferSpec], sink: PageSink | None = None) -> RequestTransfers:
        """Reserve a request's transfers: ``specs`` holds one per link this rank receives (the same request and
        destination blocks, each link once)."""
        sink = sink or self._default_sink
        if sink is None:
            raise ValueError("expect: no sink given and the receiver has no default sink")
        if not specs or len({s.request_id for s in specs}) != 1:
            raise ValueError(f"specs: one request's transfers, one per link (got {[s.request_id for s in specs]})")
        request_id = specs[0].request_id
        if len({s.head_link for s in specs}) != len(specs):
            raise ValueError(f"specs: {request_id!r} expects a link twice ({[str(s.head_link) for s in specs]})")
        group = RequestTransfers([Expectation(spec, sink) for spec in specs])
        with self._lock:
            if request_id in self._pending:
                raise ValueError(f"request_id: {request_id!r} is already expected")
            self._aborted.pop(request_id, None)
            self._pending[request_id] = group
        group.future.add_done_callback(lambda _: self._forget(request_id, group))
        return group

    def claim(self, sent: TransferSpec) -> Expectation:
        """The expectation a starting sender fills; raises TransferAborted/TransferError when there is none."""
        with self._lock:
            reason = self._aborted.get(sent.request_id)
            group = self._pending.get(sent.request_id)
        if reason is not None:
            raise TransferAborted(f"{sent.request_id}: {reason}")
        if group is None:
            raise TransferError(f"{sent.request_id}: no transfer expected (reserve pages first)")
        exp = group.link_for(sent)
        if exp is None or not exp.spec.same_layout(sent):
            err = IntegrityError(
                f"{sent.request_id}: the sender's layout [{sent.describe_layout()}] does not match the reserved "
                f"pages [{group.describe_layout()}]"
            )
            group.fail(err)
            raise err
        return exp

    def unwritten(self, request_id: str) -> Future[None]:
        """Done once no sender can write into the request's reserved pages: free them only then."""
        with self._lock:
            group = self._pending.get(request_id) or self._writing.get(request_id)
        if group is not None:
            return group.unwritten
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def abort(self, request_id: str, reason: str) -> bool:
        with self._lock:
            group = self._pending.get(request_id)
            self._remember_aborted(request_id, reason)
        return group is not None and group.abort(reason)

    @property
    def pending(self) -> int:
        """Requests whose transfers are not all done."""
        with self._lock:
            return len(self._pending)

    def fail_all(self, err: TransferError) -> None:
        with self._lock:
            pending = list(self._pending.values())
        for group in pending:
            group.fail(err)

    def _remember_aborted(self, request_id: str, reason: str) -> None:
        self._aborted[request_id] = reason
        while len(self._aborted) > _TOMBSTONES:
            self._aborted.popitem(last=False)

    def _forget(self, request_id: str, group: RequestTransfers) -> None:
        """Done: no longer expected, but still tracked while a sender may be writing its pages. A failed request's
        links that have not begun yet are told it was aborted when their senders come."""
        error = group.future.exception()
        with self._lock:
            if self._pending.get(request_id) is group:
                del self._pending[request_id]
                if error is not None and len(group.links) > 1:
                    self._remember_aborted(request_id, str(error))
            if group.unwritten.done():
                return
            self._writing[request_id] = group
        group.unwritten.add_done_callback(lambda _: self._unwritten(request_id, group))

    def _unwritten(self, request_id: str, group: RequestTransfers) -> None:
        with self._lock:
            if self._writing.get(request_id) is group:
                del self._writing[request_id]
