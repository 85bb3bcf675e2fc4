"""Measure what a simulator profile needs from a live engine on this machine, and fit it to the profile's models.

Prefill: one batch per size of a token ladder up to the engine's batch budget (piecewise-linear in the profile, so
the ladder is the model). Decode: a grid of batch sizes x context lengths, fitted to the profile's linear step model
by least squares. Mixed: colocated steps of a prompt chunk beside a few decodes, against what the prefill and decode
models give for them. KV transfer: two transfer sizes through each backend this process can run alone, fitted to
latency + bytes / bandwidth.

Engine in, numbers out: no config files and no YAML here (``profile_run`` does those), so anything that built an
engine can profile it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from splitserve.bench.engine_timing import (
    admitted_for_decode,
    finish,
    mixed_step,
    prefill_batch,
    served_decode_period,
    timed,
)
from splitserve.bench.kv_timing import PagedKV, time_backend
from splitserve.engine import Engine
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.profile import DecodeSpec, MixedSpec, TransferSpec

DECODE_HEADROOM = 64  # tokens of KV each decode sequence may grow by (as the benchmark allocates)


@dataclass(frozen=True)
class Sweep:
    """How much to measure. ``FULL`` is what a profile you plan with should come from; ``QUICK`` runs the same
    pipeline in seconds (a CPU test, a smoke check on new hardware) and gives a coarse profile."""

    prefill_stride: int  # keep every n-th power-of-two rung of the prefill ladder
    prefill_repeats: int
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_steps: int
    transfer_max_bytes: int  # the larger of the two transfer sizes is at most this
    transfer_repeats: int
    mixed_chunks: tuple[int, ...]  # prompt tokens of a mixed step
    mixed_decodes: tuple[int, ...]  # sequences decoded beside them
    mixed_context: int  # tokens each of those holds
    mixed_repeats: int


FULL = Sweep(
    1, 5, (1, 8, 32, 64, 128, 256), (128, 512, 2048, 8192), 20, 256 << 20, 5, (128, 512, 2048), (1, 8, 32), 512, 5
)
QUICK = Sweep(2, 3, (1, 4, 16), (64, 512), 3, 16 << 20, 2, (16, 64), (1, 4), 32, 3)


@dataclass(frozen=True)
class DecodePoint:
    batch: int
    context: int  # tokens each sequence holds in the cache before the step
    seconds: float

    @property
    def context_tokens(self) -> int:
        """Cached tokens attention reads over the whole batch (each sequence's context plus its new token)."""
        return self.batch * (self.context + 1)


@dataclass(frozen=True)
class MixedPoint:
    chunk: int  # prompt tokens prefilled in the step
    decodes: int  # sequences decoded beside them
    context: int  # tokens each decoding sequence holds
    seconds: float


@dataclass(frozen=True)
class ComputeProfile:
    """Everything the engine itself is measured for; the raw points are kept for the profile's header."""

    kv_bytes_per_token: int
    kv_capacity_tokens: int
    prefill_tokens: list[int]
    prefill_measured: list[float]  # median seconds of each size, as timed
    prefill_seconds: list[float]  # the same made non-decreasing: a bigger batch is never faster, a dip is noise
    decode_points: list[DecodePoint]
    decode: DecodeSpec
    decode_worst_error: float  # largest |fit - measured| / measured over the grid
    mixed_points: list[MixedPoint]
    mixed_modelled: list[float]  # per point: the longer of its prefill and decode step, as the models give them
    mixed: MixedSpec


def prefill_ladder(max_tokens: int, stride: int = 1) -> list[int]:
    """1 token, powers of two from 16 below ``max_tokens`` (every ``stride``-th), then ``max_tokens``: dense where
    the curve bends (small batches cost the weight read, large ones scale with compute), ending at the budget."""
    rungs = [1 << k for k in range(4, max_tokens.bit_length()) if 1 << k < max_tokens][::stride]
    return [1, *rungs, max_tokens] if max_tokens > 1 else [1, 2]


def split_prompts(tokens: int, longest: int) -> list[int]:
    """A ``tokens``-token batch as one prompt, or as few prompts as the model's context allows."""
    full, rest = divmod(tokens, longest)
    return [longest] * full + ([rest] if rest else [])


def measure_prefill(engine: Engine, sizes: list[int], repeats: int) -> list[float]:
    """Median seconds of one ``engine.prefill`` of each batch size (one prompt per size where the context allows:
    the costliest packing, since attention is quadratic in a prompt's length)."""
    longest = engine.max_model_len - 1
    seconds = []
    for n in sizes:
        run = prefill_batch(engine, split_prompts(n, longest), f"profile-prefill-{n}")
        run()  # warm: the first batch of a shape allocates
        seconds.append(timed(run, engine.runner.device, repeats))
    return seconds


def measure_decode(
    engine: Engine, batches: tuple[int, ...], contexts: tuple[int, ...], steps: int
) -> list[DecodePoint]:
    """The served decode step's period at each batch x context that fits the engine (others are skipped, so one
    sweep serves every model and KV cache size): consecutive ``engine.step`` calls, so the host work that grows with
    the batch (scheduling, appending and detokenizing each token) is in it where the device does not hide it."""
    limit = engine.max_model_len - DECODE_HEADROOM - 1
    points = []
    for context in (c for c in contexts if c <= limit):
        for batch in batches:
            blocks = engine.blocks.blocks_for(context + DECODE_HEADROOM) * batch
            if batch > engine.config.max_batch_size or blocks > engine.blocks.num_free:
                continue
            seqs = admitted_for_decode(engine, batch, context, f"profile-decode-{batch}x{context}")
            try:
                period = served_decode_period(engine, steps)
                points.append(DecodePoint(batch, context + steps // 2, period))  # the run's middle context
            finally:
                finish(engine, seqs)
    return points


def measure_mixed(
    engine: Engine, chunks: tuple[int, ...], decodes: tuple[int, ...], context: int, repeats: int
) -> list[MixedPoint]:
    """Median seconds of one mixed step (``engine.step``: a new prompt chunk beside admitted decodes of ``context``
    tokens) per chunk x decode count that fits the engine. Decode steps are not overlapped meanwhile: the step's own
    cost is wanted, not its wait for a step in flight."""
    overlap, engine.overlap_decode = engine.overlap_decode, False
    points = []
    try:
        for count in decodes:
            fits = [c for c in chunks if c + count <= engine.max_batch_tokens and c < engine.max_model_len]
            if not fits or count >= engine.config.max_batch_size or context + DECODE_HEADROOM >= engine.max_model_len:
                continue
            blocks = engine.blocks.blocks_for(context + DECODE_HEADROOM) * count + engine.blocks.blocks_for(max(fits))
            if blocks > engine.blocks.num_free:
                continue
            seqs = admitted_for_decode(engine, count, context, f"profile-mixed-{count}")
            try:
                for chunk in fits:
                    step = mixed_step(engine, chunk, f"profile-mixed-{count}x{chunk}")
                    step()  # warm: a new shape allocates
                    points.append(MixedPoint(chunk, count, context, timed(step, engine.runner.device, repeats)))
            finally:
                finish(engine, seqs)
    finally:
        engine.overlap_decode = overlap
    return points


def fit_mixed(
    points: list[MixedPoint], prefill_tokens: list[int], prefill_seconds: list[float], decode: DecodeSpec
) -> tuple[MixedSpec, list[float]]:
    """The profile's mixed-step terms: the ``extra_s`` and ``floor_s`` (each 0 or one of the measured excesses or
    times) whose ``max(longer + extra_s, floor_s)`` is off the points by the least summed log ratio, ``longer``
    being the longer of a point's prefill (chunk + decodes, from the ladder) and its decode step (from the fit); and
    ``longer`` per point, for the header."""
    modelled = [
        max(
            float(np.interp(p.chunk + p.decodes, prefill_tokens, prefill_seconds)),
            decode.step_time(p.decodes, p.decodes * (p.context + 1)),
        )
        for p in points
    ]
    if not points:
        return MixedSpec(), modelled
    measured, longer = np.asarray([p.seconds for p in points]), np.asarray(modelled)
    extras = sorted({0.0, *(max(0.0, float(e)) for e in measured - longer)})
    fits = [(best_floor(longer + extra, measured), extra) for extra in extras]
    (floor, _), extra = min(fits, key=lambda fit: fit[0][1])
    return MixedSpec(extra_s=extra, floor_s=floor), modelled


def best_floor(price: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """The floor (0, or one of the measured times) for which ``max(price, floor)`` is off ``measured`` by the least
    summed log ratio, and that sum: host-bound steps cost a floor whatever their shape, others their price."""
    floors = np.unique(np.concatenate([[0.0], measured]))
    errors = np.abs(np.log(np.maximum(price[None, :], floors[:, None]) / measured[None, :])).sum(axis=1)
    best = int(np.argmin(errors))
    return float(floors[best]), float(errors[best])


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient ≥ 0: a negative cost means noise, so the most negative term is dropped
    and the rest refitted until none is negative. Columns are scaled first (1 vs ~1e5 context tokens)."""
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    scaled = a / scale
    keep = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while keep:
        sol = np.linalg.lstsq(scaled[:, keep], b, rcond=None)[0]
        if (sol >= 0).all():
            coef[keep] = sol
            break
        keep.pop(int(np.argmin(sol)))
    return coef / scale


def fit_decode(points: list[DecodePoint]) -> tuple[DecodeSpec, float]:
    """The profile's decode model (base + per sequence + per context token) fitted to the measured grid, and its
    worst relative error over the grid (how far to trust the straight line)."""
    if len({(p.batch, p.context) for p in points}) < 3:
        raise ValueError(f"decode: {len(points)} grid points fit this engine; the fit needs at least 3")
    a = np.array([[1.0, p.batch, p.context_tokens] for p in points])
    b = np.array([p.seconds for p in points])
    base, per_seq, per_token = nonnegative_lstsq(a, b)
    worst = float(np.max(np.abs(a @ np.array([base, per_seq, per_token]) - b) / b))
    return DecodeSpec(base_s=float(base), per_seq_s=float(per_seq), per_context_token_s=float(per_token)), worst


def measure_compute(engine: Engine, sweep: Sweep) -> ComputeProfile:
    """Prefill ladder, decode grid and fit, and the KV figures the engine's model and cache size give directly."""
    runner = engine.runner
    capacity = runner.num_kv_blocks * runner.block_size
    # Leave room for the prompts' last partial blocks: a batch as large as the cache cannot be allocated.
    top = min(engine.max_batch_tokens, capacity // 2)
    sizes = prefill_ladder(top, sweep.prefill_stride)
    measured = measure_prefill(engine, sizes, sweep.prefill_repeats)
    points = measure_decode(engine, sweep.decode_batches, sweep.decode_contexts, sweep.decode_steps)
    if len(points) < 3:
        raise SimInputError(
            f"decode: only {len(points)} of the batch x context grid fit this engine, the fit needs 3 (fix: raise "
            "decode.max_batch_size or decode.num_kv_blocks in the config)"
        )
    decode, worst = fit_decode(points)
    prefill_seconds = [float(s) for s in np.maximum.accumulate(measured)]
    mixed_points = measure_mixed(
        engine, sweep.mixed_chunks, sweep.mixed_decodes, sweep.mixed_context, sweep.mixed_repeats
    )
    mixed, mixed_modelled = fit_mixed(mixed_points, sizes, prefill_seconds, decode)
    return ComputeProfile(
        kv_bytes_per_token=runner.spec.kv_bytes_per_token(runner.dtype.itemsize),
        kv_capacity_tokens=capacity,
        prefill_tokens=sizes,
        prefill_measured=measured,
        prefill_seconds=prefill_seconds,
        decode_points=points,
        decode=decode,
        decode_worst_error=worst,
        mixed_points=mixed_points,
        mixed_modelled=mixed_modelled,
        mixed=mixed,
    )


def local_backends(device: torch.device) -> list[str]:
    """KV transfer backends one process can measure alone: nccl needs a second GPU and process, and cuda_ipc a
    second process (CUDA cannot open an IPC handle in the process that exported it), so neither is here."""
    return ["local", "grpc", "tcp"]


def fit_transfer(small_bytes: int, small_s: float, large_bytes: int, large_s: float) -> TransferSpec:
    """Latency and bandwidth through two (bytes, seconds) points. When noise makes the larger transfer no slower,
    the bandwidth is the larger transfer's average and the latency whatever of the small one is left."""
    bandwidth = (large_bytes - small_bytes) / (large_s - small_s) if large_s > small_s else large_bytes / large_s
    return TransferSpec(latency_s=max(0.0, small_s - small_bytes / bandwidth), bandwidth_bytes_per_s=bandwidth)


def measure_kv_transfer(
    engine: Engine, backends: list[str], sweep: Sweep, options: dict[str, Any] | None = None
) -> dict[str, TransferSpec]:
    """Each backend moving one block and a large request (up to ``sweep.transfer_max_bytes``, at most the model's
    context) of the engine's KV layout between two bare caches in this process; ``options`` are the config's
    ``kv_transfer`` settings (chunk size, compression, checksum), so the figure is for the transfer as configured."""
    runner = engine.runner
    most = sweep.transfer_max_bytes // runner.block_bytes
    large_blocks = max(2, min(-(-engine.max_model_len // runner.block_size), most))
    fitted = {}
    for backend in backends:
        points = []
        for blocks in (1, large_blocks):
            src, dst = (
                PagedKV(runner.spec.num_layers, blocks, runner.page_shape[1:], runner.dtype, str(runner.device))
                for _ in range(2)
            )
            # Best of the repeats: the first also opens the connection, so it needs at least two.
            seconds = time_backend(backend, src, dst, max(2, sweep.transfer_repeats), **(options or {}))
            points.append((src.nbytes, seconds))
            del src, dst
        fitted[backend] = fit_transfer(*points[0], *points[1])
    return fitted
