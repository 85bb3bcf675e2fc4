"""How to time the engine's two phases, shared by ``benchmarks/engine.py`` and ``splitserve profile`` so a
benchmark table and a simulator profile measure the same thing the same way.

Every timing synchronises the device around the call (CUDA kernels are asynchronous: without it the host would
time only the launches) and reports a median, which ignores the odd slow call (a GC pause, a first-use capture).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch

from splitserve.engine import Engine, SamplingParams
from splitserve.engine.sequence import SeqStatus, Sequence


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn`` (synchronised around each call)."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _synthetic_sequences(engine: Engine, batch: int, context: int, tag: str) -> list[Sequence]:
    """``batch`` distinct ``context``-token prompts that never end by themselves."""
    vocab = engine.spec.vocab_size
    return [
        engine.make_sequence(
            f"{tag}-{i}",
            [(i * 7 + j) % vocab for j in range(context)],
            SamplingParams(max_tokens=1 << 20, ignore_eos=True),
        )
        for i in range(batch)
    ]


def decode_ready(engine: Engine, batch: int, context: int, tag: str) -> list[Sequence]:
    """Sequences whose ``context`` prompt tokens are (notionally) in the cache, ready for decode steps.

    Skipping the prefill keeps a large grid cheap: a decode step's time depends on how many tokens its attention
    reads, not on their values. The caller frees ``seq.block_table`` of each when done.
    """
    seqs = _synthetic_sequences(engine, batch, context, tag)
    for seq in seqs:
        seq.block_table = engine.blocks.allocate(engine.blocks.blocks_for(context + 64))
        seq.num_computed_tokens = context
        seq.output_token_ids.append(1)
        seq.status = SeqStatus.RUNNING
    return seqs


def decode_step(engine: Engine, seqs: list[Sequence]) -> Callable[[], None]:
    """One decode step (forward + sampling) over ``seqs`` that leaves them at the same context length, so every
    call reads the same bytes and can be repeated for a median."""
    runner = engine.runner

    def step() -> None:
        runner.execute([], seqs)
        for s in seqs:
            s.num_computed_tokens -= 1

    return step


def admitted_for_decode(engine: Engine, batch: int, context: int, tag: str) -> list[Sequence]:
    """Requests admitted the way a decode worker admits them (pages reserved, first token in), so ``engine.step``
    runs a whole served step over them; their prompts' KV is never computed (``decode_ready``). ``finish`` them
    when done."""
    seqs = _synthetic_sequences(engine, batch, context, tag)
    for seq in seqs:
        engine.reserve(seq)
        engine.admit(seq.request_id, 1)
    return seqs


def served_decode_period(engine: Engine, steps: int) -> float:
    """Mean seconds per ``engine.step`` over ``steps`` consecutive decode steps of the running requests: the period
    a served batch decodes at (scheduler, forward, sampling, each token appended and detokenized), with each step's
    host work hidden behind the device's where the engine overlaps steps. One step is launched before the clock
    starts, so each timed call launches one and reads one back. Each request grows by ``steps + 1`` tokens."""
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    return (time.perf_counter() - start) / steps


def finish(engine: Engine, seqs: list[Sequence]) -> None:
    """Abort ``seqs`` and run the engine until the step in flight is read back, so every page is free again."""
    for seq in seqs:
        engine.abort(seq.request_id)
    while engine.has_work():
        engine.step()


def mixed_step(engine: Engine, chunk: int, tag: str) -> Callable[[], None]:
    """One ``engine.step`` that prefills a new ``chunk``-token prompt beside the running decodes (a colocated mixed
    step). Each prompt asks for one token, so it ends in that step and its pages are free again."""
    vocab = engine.spec.vocab_size
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    calls = itertools.count()

    def step() -> None:
        n = next(calls)
        engine.add_request(f"{tag}-{n}", [(n * 13 + j) % vocab for j in range(chunk)], params)
        engine.step()

    return step


def prefill_batch(engine: Engine, lengths: list[int], tag: str) -> Callable[[], None]:
    """One ``engine.prefill`` of fresh prompts of ``lengths`` tokens, released afterwards.

    The engine must have prefix caching off, or repeated calls would find the prompts cached and compute nothing.
    """
    vocab = engine.spec.vocab_size

    def run() -> None:
        seqs = [
            engine.make_sequence(f"{tag}-{i}", [(i + j) % vocab for j in range(n)], SamplingParams(max_tokens=1))
            for i, n in enumerate(lengths)
        ]
        engine.prefill(seqs)
        for s in seqs:
            engine.release(s.request_id)

    return run
