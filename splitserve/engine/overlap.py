"""Overlapped steps: step k+1 is launched before step k's tokens are read back.

A decode step's host work (scheduling, staging inputs, then appending and detokenizing every sampled token) left
the GPU idle: on two H200s a 45-sequence step served 3.2 of its 11.5 ms on the host (docs/benchmarks.md, seventh
session). With one step in flight while the host reads back the one before, the host work hides behind the device's.

What that costs the engine, and where it is paid:
- step k+1 needs step k's tokens as inputs before the host has them: each sequence holds a placeholder
  (``PENDING_TOKEN``) in ``output_token_ids`` from launch to read-back, and the step's input ids are copied on the
  device from step k's sampled tensor (``TokenFeed``);
- a sequence that stops at step k (EOS, a stop token or string) has one more token computed in step k+1, thrown
  away; a sequence whose ``max_tokens`` or context ends at step k is known ahead and left out of step k+1;
- a sequence that ends (or is aborted) while a step that writes its KV is in flight keeps its pages until that step
  is read back (``InFlight.deferred``): a KV transfer landing in them once they are reserved again would race it.

A step with prompt chunks (a colocated engine's mixed step) is launched ahead too: its decode rows are fed the same
way, and a prompt that completes in it holds a placeholder for its first token. So a prompt that arrives while a step
is in flight does not wait for that step's read-back before its own launch (an eager pass, host-bound for short
prompts). A preemption or a layer hook runs in an ordinary step after the one in flight is read back: preempting
recomputes a sequence from its tokens, which must all be on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from splitserve.engine.host_copy import index_tensor
from splitserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from splitserve.engine.runner import LaunchedStep

PENDING_TOKEN = -1  # an output token sampled on the device and not read back yet


def awaits_token(seq: Sequence) -> bool:
    """Whether ``seq``'s newest output token is still on the device (a step in flight sampled it)."""
    return bool(seq.output_token_ids) and seq.output_token_ids[-1] == PENDING_TOKEN


@dataclass
class TokenFeed:
    """Input ids still on the device: row ``rows[i]`` of a step reads ``source[source_rows[i]]``."""

    source: torch.Tensor
    rows: list[int]
    source_rows: list[int]

    def write_into(self, input_ids: torch.Tensor) -> None:
        """Copy the fed ids into ``input_ids`` in stream order (after the step that sampled them, before the one
        that reads them), with no host sync."""
        device = input_ids.device
        picked = self.source.index_select(0, index_tensor(self.source_rows, device))
        input_ids.index_copy_(0, index_tensor(self.rows, device), picked)


@dataclass(eq=False)
class InFlight:
    """A launched step, not read back yet."""

    step: LaunchedStep
    at: list[int]  # per row: the index of its placeholder in its sequence's output_token_ids
    deferred: list[Sequence] = field(default_factory=list)  # ended meanwhile: pages freed at read-back
    _rows: dict[Sequence, int] = field(init=False)

    def __post_init__(self) -> None:
        self._rows = {seq: i for i, seq in enumerate(self.step.seqs)}

    def includes(self, seq: Sequence) -> bool:
        return seq in self._rows

    def feed_for(self, batch: list[Sequence]) -> TokenFeed | None:
        """Where ``batch``'s placeholders will come from: this step's sampled tokens."""
        rows, source_rows = [], []
        for i, seq in enumerate(batch):
            if awaits_token(seq):
                rows.append(i)
                source_rows.append(self._rows[seq])
        if not rows:
            return None
        assert self.step.tokens is not None
        return TokenFeed(self.step.tokens, rows, source_rows)
