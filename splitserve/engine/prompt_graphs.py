"""CUDA graphs for whole short prompts: their eager pass is bound by the host's launches, not by the device.

A served step with a prompt chunk of at most 1024 tokens costs about the same for 128 tokens as for 1024 and
several times its device work (docs/benchmarks.md): the eager pass launches ~1000 kernels from Python, on a host
the worker's event loop and Ray share.

A prompt computed from its first token in one chunk (no cached prefix, so its attention is its own causal block)
has shapes that depend only on its length: it is padded to the next rung of a ladder of lengths and replays that
rung's graph. The padding rows come after the prompt's, so causal attention keeps them out of every real row; they
write their KV into the scratch block the block manager never hands out, and the graph takes the logits of the
prompt's last real row only. All rungs are captured when the engine starts, largest first, in one memory pool of
their own (a decode graph's output must survive a prompt graph's replay in the same step).

A prefill worker streams each layer's KV as soon as that layer is computed. A graph cannot call the host back, so
each graph records an event as each layer ends (``layer_done``), and the layer hook runs once the replays are
launched, on a side stream that waits for that layer's event: the transfer still overlaps the layers after it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.cuda_graphs import GraphLadder
from splitserve.engine.host_copy import index_tensor
from splitserve.engine.model import LayerHook

LADDER = (64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)

PromptForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, LayerHook], torch.Tensor]
"""(input_ids [L], positions [L], metadata, row [1], layer hook) -> float32 logits [1, vocab] of hidden row ``row``."""


class PromptGraphs(GraphLadder):
    def __init__(
        self,
        forward: PromptForward,
        block_size: int,
        scratch_slot: int,
        device: torch.device,
        max_tokens: int,
        num_layers: int,
    ):
        super().__init__([r for r in LADDER if r <= max_tokens], device)
        self.forward = forward
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        top = self.rungs[-1] if self.rungs else 0
        self._tokens = torch.zeros(3, top, dtype=torch.long, device=device)  # input ids, positions, KV slots
        self._row = torch.zeros(1, dtype=torch.long, device=device)
        # Recorded by every rung's graph (external: a record node, not a capture-internal dependency); a wait on one
        # sees the latest replay launched, and on one stream that is after every earlier replay.
        self.layer_done = [torch.cuda.Event(external=True) for _ in range(num_layers)]
        self._hook_stream = torch.cuda.Stream(device)

    def run(self, input_ids: list[int], slots: list[int]) -> torch.Tensor:
        """Logits [1, vocab] of the prompt's last token: a copy, as the next replay reuses the graphs' memory."""
        n = len(input_ids)
        rung = self.rung_for(n)
        assert rung is not None and n > 0, f"a prompt of {n} tokens has no graph (the longest is {self.rungs[-1]})"
        self._stage(input_ids, list(range(n)), slots, rung)
        return self._replay(rung).clone()

    def _capture(self, rung: int) -> None:
        """Record a ``rung``-token prompt on padding rows only (their KV goes to the scratch slot)."""
        self._stage([], [], [], rung)
        ids, pos, slots = self._tokens[0, :rung], self._tokens[1, :rung], self._tokens[2, :rung]
        meta = AttentionMetadata.whole_prompt(slots, self.block_size)
        self._record(rung, lambda: self.forward(ids, pos, meta, self._row, self._mark_layer))

    def _mark_layer(self, layer: int) -> None:
        self.layer_done[layer].record()

    def run_layer_hook(self, hook: LayerHook) -> None:
        """Call ``hook`` for each layer of the replays launched so far, on a side stream at that layer's end: what
        it queues there reads the layer's KV as soon as every launched replay has written it. The caller's stream
        then waits for the side stream, so its later work stays ordered after the hook's, as in an eager pass."""
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._hook_stream):
            for layer, done in enumerate(self.layer_done):
                self._hook_stream.wait_event(done)
                hook(layer)
        caller.wait_stream(self._hook_stream)

    def _stage(self, input_ids: list[int], positions: list[int], slots: list[int], rung: int) -> None:
        """Copy one prompt, padded to ``rung`` rows, into the graphs' inputs (from fresh pinned memory: several
        prompts may replay in one step, each staged before the replay before it has run)."""
        pad = rung - len(input_ids)
        rows = [input_ids + [0] * pad, positions + [0] * pad, slots + [self.scratch_slot] * pad]
        self._tokens[:, :rung].copy_(index_tensor(rows, self.device))
        self._row.fill_(max(len(input_ids), 1) - 1)
