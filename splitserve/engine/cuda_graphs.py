"""CUDA graphs for decode-only steps: one graph replay instead of ~1300 kernel launches from Python.

A decode step's shapes depend only on the batch size (the paged decode kernel loops up to each sequence's own
length), so one graph per batch size covers every step of that size. Batches are padded up to the next rung of a
ladder of sizes, which ends at the engine's largest decode batch. Every rung is captured when the engine starts,
largest first, so that no step stalls on a capture while serving and the smaller graphs fit in the memory the largest
one left in the pool. All graphs read the same static input buffers (views of the first ``rung`` rows) and share
one memory pool, so the rungs together cost about as much memory as the largest one.

Padding rows are harmless by construction: token 0 at position 0, context length 0 (the kernel reads nothing and
writes zeros) and a KV slot in a scratch block that the block manager never hands out.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from splitserve.engine.attention import AttentionMetadata, DecodeKernel
from splitserve.engine.overlap import TokenFeed

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)

DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
"""(input_ids [B], positions [B], metadata) -> float32 logits [B, vocab]: the model, final norm and LM head."""


class _HostInputs:
    """Pinned host copies of a graph's inputs (so their copies are asynchronous), with numpy views to fill them."""

    def __init__(self, rows: int, max_blocks_per_seq: int):
        self.tokens = torch.zeros(3, rows, dtype=torch.long, pin_memory=True)
        self.tables = torch.zeros(rows, max_blocks_per_seq, dtype=torch.int32, pin_memory=True)
        self.lens = torch.zeros(rows, dtype=torch.int32, pin_memory=True)
        self.tokens_np, self.tables_np, self.lens_np = self.tokens.numpy(), self.tables.numpy(), self.lens.numpy()


class GraphLadder:
    """Graphs of one forward, one per rung of a ladder of sizes, in one memory pool: an input is padded up to the
    smallest rung that holds it. Subclasses stage inputs and record each rung (``_capture``)."""

    def __init__(self, rungs: list[int], device: torch.device):
        self.rungs = rungs
        self.device = device
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.replays = 0

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def rung_for(self, size: int) -> int | None:
        """The smallest rung that holds ``size``; None when it is larger than the ladder."""
        return next((r for r in self.rungs if r >= size), None)

    def capture_all(self) -> None:
        """Capture every rung on padding only, largest first (the smaller ones reuse its memory)."""
        for rung in reversed(self.rungs):
            self._capture(rung)

    def _capture(self, rung: int) -> None:
        raise NotImplementedError

    def _record(self, rung: int, forward: Callable[[], torch.Tensor]) -> None:
        began = time.perf_counter()
        self._graphs[rung] = capture(forward, self._pool, self.device)
        self.capture_seconds += time.perf_counter() - began

    def _replay(self, rung: int) -> torch.Tensor:
        """Replay ``rung``'s graph; its output, overwritten by the next replay in the pool."""
        graph, out = self._graphs[rung]
        graph.replay()
        self.replays += 1
        return out


class DecodeGraphs(GraphLadder):
    def __init__(
        self,
        forward: DecodeForward,
        kernel: DecodeKernel,
        max_blocks_per_seq: int,
        block_size: int,
        scratch_slot: int,
        device: torch.device,
        max_batch: int,
    ):
        super().__init__(sorted({r for r in LADDER if r < max_batch} | {max_batch}), device)
        self.forward = forward
        self.kernel = kernel
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        top = self.rungs[-1]
        # Two sets of pinned host buffers, used in turn (see _stage); rows of tokens: input ids, positions, KV slots.
        self._host = [_HostInputs(top, max_blocks_per_seq) for _ in range(2)]
        self._turn = 0
        self._tokens = torch.zeros(3, top, dtype=torch.long, device=device)
        self._tables = torch.zeros(top, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._lens = torch.zeros(top, dtype=torch.int32, device=device)

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        block_tables: Sequence[list[int]],
        context_lens: list[int],
        feed: TokenFeed | None = None,
    ) -> torch.Tensor:
        """Logits [len(input_ids), vocab] for one decode step; the returned tensor is overwritten by the next call.
        ``feed`` overwrites input ids that are still on the device."""
        n = len(input_ids)
        rung = self.rung_for(n)
        assert rung is not None, f"decode batch {n} is larger than the largest graph ({self.rungs[-1]})"
        self._stage(input_ids, positions, slots, block_tables, context_lens, rung)
        if feed is not None:
            feed.write_into(self._tokens[0, :rung])
        return self._replay(rung)[:n]

    def _stage(self, input_ids, positions, slots, block_tables, context_lens, rung: int) -> None:
        """Fill pinned host buffers (no tensor is allocated) and start their copies to the device.

        The two sets of host buffers take turns without a wait: with one step in flight while the host stages the
        next (overlapped decode), the set staged two steps ago has been copied, since the host has read that step's
        tokens back by now.
        """
        n = len(input_ids)
        host = self._host[self._turn]
        self._turn ^= 1
        tokens, tables, lens = host.tokens_np, host.tables_np, host.lens_np
        tokens[0, :n] = input_ids
        tokens[1, :n] = positions
        tokens[2, :n] = slots
        tokens[:2, n:rung] = 0
        tokens[2, n:rung] = self.scratch_slot
        lens[:n] = context_lens
        lens[n:rung] = 0
        width = tables.shape[1]
        for i, table in enumerate(block_tables):
            # Entries past the context are never read; a table is never longer than the model's context needs.
            used = min(len(table), width)
            tables[i, :used] = table[:used]
        self._tokens.copy_(host.tokens, non_blocking=True)
        self._tables[:rung].copy_(host.tables[:rung], non_blocking=True)
        self._lens[:rung].copy_(host.lens[:rung], non_blocking=True)

    def _metadata(self, rung: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._tokens[2, :rung],
            block_size=self.block_size,
            prefill_query_lens=[],
            prefill_context_lens=[],
            prefill_block_tables=None,
            decode_block_tables=self._tables[:rung],
            decode_context_lens=self._lens[:rung],
            decode_kernel=self.kernel,
        )

    def _capture(self, rung: int) -> None:
        """Record the forward for ``rung`` padding rows (they write their KV only to the scratch slot, so the
        warm-up run touches no sequence)."""
        self._stage([], [], [], [], [], rung)
        ids, pos, meta = self._tokens[0, :rung], self._tokens[1, :rung], self._metadata(rung)
        self._record(rung, lambda: self.forward(ids, pos, meta))


def capture(
    forward: Callable[[], torch.Tensor], pool: _POOL_HANDLE, device: torch.device
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A graph of ``forward`` in ``pool``, and its output (overwritten by each replay). A warm-up run first compiles
    the Triton kernels and creates cuBLAS handles, which must not happen during capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a worker's other threads (KV transfer, server) may touch CUDA while this one captures.
    with _collector_paused(), torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = forward()
    return graph, out


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection inside a capture: a collection runs finalizers on the capturing thread, and a CUDA call
    one makes there (releasing an old engine's graphs, events or memory) may invalidate the capture. Collected once
    before instead, so the pause does not grow the heap."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
