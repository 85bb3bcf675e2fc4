"""A transfer whose destination pages are not known yet when its prompt starts computing.

The decode worker reserves pages while the prefill worker already computes the prompt, so the reservation's round
trip is not on the time to first token. Layers computed before the pages are known are kept (they are the gathered
copies every backend is handed anyway) and sent, in order, the moment ``open`` gives the pages.

Threads: ``send_layer`` on the engine's; the rest on any. A kept CUDA layer carries an event recorded where it was
gathered, and the thread that sends it later makes its own stream wait for it (a backend orders its device work
after the calling thread's current stream): from a replayed prompt graph the layer hooks all run right after the
launch, long before the pass ends, so the pages usually come while the pass still computes and the kept layers
go from the thread that learnt them, not after the pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from splitserve.kv_transfer.base import SendHandle
from splitserve.kv_transfer.errors import TransferAborted, TransferError, TransferTimeout


class DeferredSend:
    """A ``SendHandle`` that begins the real transfer once its destination pages are known."""

    def __init__(self, begin: Callable[[list[int]], SendHandle], timeout_s: float):
        self._begin = begin
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._layers: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []
        self._handle: SendHandle | None = None
        self._closed: TransferError | None = None  # ended before it opened: why
        self._settled = threading.Event()  # opened, or closed

    @property
    def opened(self) -> bool:
        return self._handle is not None

    @property
    def settled(self) -> bool:
        return self._settled.is_set()

    def send_layer(self, layer: int, pages: torch.Tensor) -> None:
        with self._lock:
            handle = self._handle
            if handle is None:
                if self._closed is None:
                    self._layers.append((layer, pages, _gathered(pages)))
                return
        handle.send_layer(layer, pages)

    def open(self, dst_block_ids: list[int]) -> None:
        """The pages are reserved: begin the transfer and send the layers kept so far. A no-op once closed."""
        with self._lock:  # held while the kept layers go, so an abort meanwhile reaches the real transfer after them
            if self._closed is not None or self._handle is not None:
                return
            self._handle = self._begin(dst_block_ids)
            for layer, pages, gathered in self._layers:
                if gathered is not None:
                    stream = torch.cuda.current_stream(pages.device)
                    stream.wait_event(gathered)
                    pages.record_stream(
                        stream
                    )  # the allocator must not hand the pages out before this stream used them
                self._handle.send_layer(layer, pages)
            self._layers.clear()
        self._settled.set()

    def fail(self, error: TransferError) -> None:
        """The pages will never come (the reservation failed): end it unopened. A no-op once opened."""
        self._close(error)

    def abort(self, reason: str) -> None:
        if not self._close(TransferAborted(f"aborted by the sender ({reason})")):
            assert self._handle is not None
            self._handle.abort(reason)

    def finish(self) -> int:
        # Every path settles it (the reservation's answer or failure, an abort): the timeout is the last resort.
        if not self._settled.wait(self._timeout_s):
            self._close(TransferTimeout(f"no destination pages after {self._timeout_s} s"))
        with self._lock:
            handle, closed = self._handle, self._closed
        if handle is None:
            assert closed is not None
            raise closed
        return handle.finish()

    def _close(self, error: TransferError) -> bool:
        """End it unopened with ``error``; False where it had opened already."""
        with self._lock:
            if self._handle is not None:
                return False
            if self._closed is None:
                self._closed = error
                self._layers.clear()
        self._settled.set()
        return True


def _gathered(pages: torch.Tensor) -> torch.cuda.Event | None:
    """An event after the work that made ``pages``, on the stream current here (None on CPU)."""
    if not pages.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(pages.device))
    return event
