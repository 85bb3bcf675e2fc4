"""A prefill rank's part of a request's KV transfer to a decode worker of another TP degree.

The rank sends one transfer per link (head_map.py) to the decode rank at its other end, each carrying the link's
KV heads of every layer: nothing is gathered through one process. Between equal degrees a rank has one link, all
its heads, and sends its pages as a single-rank worker does.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from splitserve.engine.page_copy import Blocks, PagedKVCache
from splitserve.kv_transfer.base import SendHandle
from splitserve.kv_transfer.errors import TransferError
from splitserve.kv_transfer.head_map import HeadLink

H = TypeVar("H", bound=SendHandle)


class LinkSends(Generic[H]):
    """One request's transfers from this rank, one handle per link (a ``DeferredSend`` while the decode side's pages
    are still being reserved: ``open`` each of ``handles`` once they are known)."""

    def __init__(self, pages: PagedKVCache, blocks: Blocks, sends: list[tuple[HeadLink, H]]):
        self._pages = pages
        self._blocks = blocks
        self._sends = sends

    @property
    def handles(self) -> list[H]:
        return [handle for _, handle in self._sends]

    def send_layer(self, layer: int) -> None:
        """From the layer hook: each link's heads of ``layer``, gathered into one contiguous copy per link."""
        for link, handle in self._sends:
            handle.send_layer(layer, self._pages.gather_pages(layer, self._blocks, link.src_slice))

    def finish(self) -> int:
        """Wait for every link; the payload bytes of all. The first link to fail ends the ones not yet done (the
        request cannot be admitted without them) and its error is raised."""
        total = 0
        failed: tuple[HeadLink, TransferError] | None = None
        for link, handle in self._sends:
            if failed is not None:
                handle.abort(f"the link of {failed[0]} failed: {failed[1]}")
                continue
            try:
                total += handle.finish()
            except TransferError as err:
                failed = (link, err)
        if failed is not None:
            raise failed[1]
        return total

    def abort(self, reason: str) -> None:
        for _, handle in self._sends:
            handle.abort(reason)
