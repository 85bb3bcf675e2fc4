"""A transfer whose destination pages are not known yet when its prompt starts computing.

The decode worker reserves pages while the prefill worker already computes the prompt, so the reservation's round
trip is not on the time to first token. Layers computed before the pages are known are kept (they are the gathered
copies every backend is handed anyway) and sent, in order, the moment ``open`` gives the pages.

Threads: ``send_layer`` on the engine's; the rest on any. From a replayed prompt graph the layer hooks all run right
after the launch, long before the pass ends, so the pages usually come while the pass still computes, on another
thread. A backend orders its device work after the calling thread's current stream, which there is the engine's
default stream, behind the whole pass. So kept CUDA layers go on a stream of their own that waits only for each
layer's gather (an event recorded where it was gathered), and the next layer sent from the engine waits for that
stream, so every layer's device work stays in order.

The pages may also say that the receiver holds the first ``skip_blocks`` of the prompt's blocks already (its prefix
cache): every layer, kept or not, then goes without them.
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
        self._kept_sent: torch.cuda.Event | None = None  # the kept layers' device work, for the next layer to follow
        self._skip = 0  # leading blocks the receiver holds: not sent

    @property
    def opened(self) -> bool:
        return self._handle is not None

    @property
    def settled(self) -> bool:
        return self._settled.is_set()

    def send_layer(self, layer: int, pages: torch.Tensor) -> None:
        with self._lock:
            handle, kept_sent, self._kept_sent = self._handle, self._kept_sent, None
            if handle is None:
                if self._closed is None:
                    self._layers.append((layer, pages, _gathered(pages)))
                return
        if kept_sent is not None:
            torch.cuda.current_stream(pages.device).wait_event(kept_sent)
        handle.send_layer(layer, _trim(pages, self._skip))

    def open(self, dst_block_ids: list[int], skip_blocks: int = 0) -> None:
        """The pages are reserved: begin the transfer and send the layers kept so far, each without its first
        ``skip_blocks`` blocks (which the receiver holds). A no-op once closed."""
        with self._lock:  # held while the kept layers go, so an abort meanwhile reaches the real transfer after them
            if self._closed is not None or self._handle is not None:
                return
            self._skip = skip_blocks
            self._handle = self._begin(dst_block_ids)
            kept, self._layers = self._layers, []
            if kept and kept[0][2] is not None:
                self._kept_sent = _send_on_own_stream(self._handle, kept, skip_blocks)
            else:
                for layer, pages, _ in kept:
                    self._handle.send_layer(layer, _trim(pages, skip_blocks))
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


def _trim(pages: torch.Tensor, skip_blocks: int) -> torch.Tensor:
    """A layer's gathered pages ([2, blocks, ...]) without the first ``skip_blocks`` blocks, contiguous as sent."""
    return pages if skip_blocks == 0 else pages[:, skip_blocks:].contiguous()


def _send_on_own_stream(
    handle: SendHandle, kept: list[tuple[int, torch.Tensor, torch.cuda.Event | None]], skip_blocks: int
) -> torch.cuda.Event:
    """Send kept CUDA layers from a stream that waits only for their gathers; an event after their device work."""
    device = kept[0][1].device
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        for layer, pages, gathered in kept:
            assert gathered is not None
            stream.wait_event(gathered)
            pages.record_stream(stream)  # the allocator must not hand the pages out before this stream read them
            handle.send_layer(layer, _trim(pages, skip_blocks))
    done = torch.cuda.Event()
    done.record(stream)
    return done


def _gathered(pages: torch.Tensor) -> torch.cuda.Event | None:
    """An event after the work that made ``pages``, on the stream current here (None on CPU)."""
    if not pages.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(pages.device))
    return event
