"""Every engine step's time and shape, for checking a profile against a serving worker.

The simulator prices a step from its shape (prompt tokens, decodes, their context) with a profile measured on an
engine alone; a served step also shares its process with the worker's event loop, the KV receiver and Ray. With
``SPLITSERVE_STEP_TRACE`` naming a directory, every engine appends one line per step to
``<dir>/steps-<pid>.log``, and ``python -m splitserve.bench.step_report DIR --profile P`` sets each step beside the
profile's price for its shape. Off (one attribute read per step) unless the variable is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from splitserve.engine.sequence import Sequence
from splitserve.trace_file import TraceFile

ENV = "SPLITSERVE_STEP_TRACE"
PREFIX = "steps-"


@dataclass(frozen=True)
class StepRecord:
    start: float  # time.perf_counter() when the step began
    seconds: float  # the engine call's wall time (overlapped: launching this step and reading back the previous one)
    device_wait_s: float  # the part spent waiting for the device
    prefill_tokens: int  # prompt tokens launched
    prefill_seqs: int  # prompt chunks launched
    decodes: int  # decode rows launched
    decode_context: int  # the decode rows' context tokens, summed
    read_back: bool  # whether the call read back an earlier step's tokens (overlap) rather than its own
    pid: int = 0  # the writer (set by ``load``)

    @property
    def kind(self) -> str:
        if self.prefill_tokens and self.decodes:
            return "mixed"
        return "prefill" if self.prefill_tokens else "decode"


_trace = TraceFile(ENV, PREFIX)
_WRITTEN_FIELDS = len(fields(StepRecord)) - 1  # all but pid, in their order


def directory() -> str | None:
    """Where this process's engines write steps; None while the trace is off."""
    return _trace.directory


def record(
    start: float,
    seconds: float,
    device_wait_s: float,
    chunks: list[tuple[Sequence, int]],
    decodes: list[Sequence],
    read_back: bool,
) -> None:
    """Append one step (callers check ``directory()`` first: the shape costs a pass over the batch)."""
    context = sum(seq.num_tokens for seq in decodes)
    _trace.write(
        f"{start:.6f} {seconds:.6f} {device_wait_s:.6f} {sum(n for _, n in chunks)} {len(chunks)} {len(decodes)} "
        f"{context} {int(read_back)}\n"
    )


def load(directory: str | os.PathLike[str]) -> list[StepRecord]:
    """Every process's steps under ``directory``, in time order."""
    steps = []
    for path in Path(directory).glob(f"{PREFIX}*.log"):
        pid = int(path.stem.removeprefix(PREFIX))
        for line in path.read_text().splitlines():
            values = line.split()
            if len(values) != _WRITTEN_FIELDS:
                continue  # a line cut short by a killed worker
            start, seconds, waited = (float(v) for v in values[:3])
            tokens, chunks, decodes, context = (int(v) for v in values[3:7])
            steps.append(StepRecord(start, seconds, waited, tokens, chunks, decodes, context, values[7] == "1", pid))
    return sorted(steps, key=lambda s: s.start)
