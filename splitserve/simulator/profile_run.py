"""``splitserve profile``: build the engine a cluster config describes, measure it (``measure``), and write the
profile YAML the simulator reads, headed by a comment saying where, when, how and with what it was measured.

What cannot be measured in one process is said in the header rather than guessed: nccl needs two GPUs (an entry
comes only from ``--nccl``), the price of a GPU-hour is the user's (required on a GPU), and a CPU has no NVML power
reading (placeholders, marked as such).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from splitserve.config import ConfigError, SplitserveConfig, load_config
from splitserve.engine import Engine
from splitserve.engine.engine import EngineConfig
from splitserve.engine.rank_loop import offline_engine
from splitserve.engine.tensor_parallel import TensorParallelError
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.hardware import PowerSampler, describe_device, device_slug
from splitserve.simulator.measure import (
    FULL,
    QUICK,
    ComputeProfile,
    Sweep,
    local_backends,
    measure_compute,
    measure_kv_transfer,
)
from splitserve.simulator.profile import GPUSpec, PrefillSpec, Profile, TransferSpec, load_profile

CPU_POWER_W = 1.0  # a placeholder: GPUSpec needs power_w > 0, and a CPU profile's energy figures mean nothing
IDLE_SAMPLE_S = 0.5


@dataclass(frozen=True)
class GPUFlags:
    """What the command line says about the GPU entry; None = measure it, or use the CPU placeholder."""

    name: str | None = None
    cost_per_hour: float | None = None
    power_w: float | None = None
    idle_power_w: float | None = None


@dataclass(frozen=True)
class Result:
    profile: Profile
    path: Path
    seconds: float


def engine_config_for(config: SplitserveConfig) -> EngineConfig:
    """The engine a decode worker of ``config`` runs (its KV cache is the capacity the profile reports), with the
    prefill pool's batch budget, prefix caching off (a repeated prompt must be recomputed, not found cached) and no
    tokenizer (only token ids go in)."""
    from splitserve.cluster.worker_options import options_for
    from splitserve.engine.resolve import resolve_model_path

    try:
        model_dir = str(resolve_model_path(config.model.path))
    except FileNotFoundError as err:
        raise SimInputError(str(err)) from None
    engine_config = options_for(config, config.decode, model_dir).engine_config()
    return replace(engine_config, enable_prefix_caching=False, load_tokenizer=False)


def _gpu_spec(
    device: torch.device, flags: GPUFlags, idle: float | None, busy: float | None
) -> tuple[GPUSpec, list[str]]:
    """The GPU entry, and a header line saying where each of its figures came from."""
    on_gpu = device.type == "cuda"
    if on_gpu:  # cost was checked before measuring; NVML readings stand in for power flags not given
        fallback = {"cost": None, "power": busy, "idle": idle}
        how = {
            "cost": "not given",
            "power": "NVML median while prefill and decode ran",
            "idle": "NVML median before the model loaded",
        }
    else:
        fallback = {"cost": 0.0, "power": CPU_POWER_W, "idle": 0.0}
        how = dict.fromkeys(fallback, "placeholder")
    given = {"cost": flags.cost_per_hour, "power": flags.power_w, "idle": flags.idle_power_w}
    value = {k: v if v is not None else fallback[k] for k, v in given.items()}
    if value["power"] is None or value["idle"] is None:
        raise SimInputError("--power-w/--idle-power-w: NVML gave no power reading (fix: pass both)")
    spec = GPUSpec(
        name=flags.name or device_slug(device),
        cost_per_hour=value["cost"] or 0.0,
        power_w=value["power"],
        idle_power_w=value["idle"],
    )

    def source(key: str) -> str:
        return "given" if given[key] is not None else how[key]

    line = (
        f"gpu: name {'given' if flags.name else 'from the device'}; {spec.cost_per_hour:g} $/h ({source('cost')}); "
        f"power {spec.power_w:.4g} W ({source('power')}), idle {spec.idle_power_w:.4g} W ({source('idle')})"
    )
    if not on_gpu:
        line += "; a CPU has no NVML reading: energy figures of plans made with it mean nothing"
    return spec, [line + "."]


def _rounded(value: Any) -> Any:
    """Four significant digits: more than any measurement here is repeatable to, and a readable file."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _compute_notes(engine: Engine, compute: ComputeProfile, sweep: Sweep) -> list[str]:
    raised = sum(m < s for m, s in zip(compute.prefill_measured, compute.prefill_seconds, strict=True))
    measured = zip(compute.prefill_tokens, compute.prefill_measured, strict=True)
    lines = [
        f"prefill: one engine.prefill per batch size (one prompt, split only at the model's context), median of "
        f"{sweep.prefill_repeats}; {raised} point(s) raised to a smaller batch's time (a bigger batch is never "
        "faster: noise). Measured (tokens: ms): " + ", ".join(f"{n}: {t * 1e3:.3g}" for n, t in measured) + ".",
        f"decode: mean of {sweep.decode_steps} consecutive engine.step calls (scheduler, forward, sampling, tokens "
        "appended and detokenized; overlapped where the engine overlaps steps), the context at the run's middle, per "
        "batch x context (ms, measured):",
    ]
    for context in sorted({p.context for p in compute.decode_points}):
        row = [p for p in compute.decode_points if p.context == context]
        lines.append(f"  context {context}: " + ", ".join(f"batch {p.batch} {p.seconds * 1e3:.3g}" for p in row))
    lines.append(
        f"  fitted by least squares (coefficients >= 0); worst error over the grid {compute.decode_worst_error:.0%}."
    )
    if compute.mixed_points:
        lines.append(
            f"mixed: one engine.step with a new prompt chunk beside decodes of {compute.mixed_points[0].context} "
            f"tokens, not overlapped, median of {sweep.mixed_repeats}; extra_s and floor_s fit max(longer + extra_s, "
            "floor_s) to them, longer being the longer of the chunk's prefill and the decode step (ms, measured / "
            "longer):"
        )
        pairs = list(zip(compute.mixed_points, compute.mixed_modelled, strict=True))
        for count in sorted({point.decodes for point in compute.mixed_points}):
            cells = [
                f"chunk {point.chunk} {point.seconds * 1e3:.3g} / {modelled * 1e3:.3g}"
                for point, modelled in pairs
                if point.decodes == count
            ]
            lines.append(f"  {count} decode(s): " + ", ".join(cells))
    else:
        lines.append("mixed: no mixed step fits this engine's batch and cache; extra_s and floor_s left at 0.")
    lines += [
        f"kv_capacity_tokens: the decode pool's KV cache under this config ({engine.runner.num_kv_blocks} blocks of "
        f"{engine.runner.block_size} tokens); kv_bytes_per_token: 2 x layers x kv heads x head dim x dtype bytes.",
    ]
    return lines


def _transfer_notes(measured: list[str], nccl: tuple[float, float] | None) -> list[str]:
    lines = [
        f"kv_transfer: {', '.join(measured)} measured in this process (one block and one large request, latency + "
        "bandwidth through the two); grpc runs over loopback: a real network is slower."
    ]
    if nccl is None:
        lines.append(
            "  nccl: not measured (it needs two GPUs); add it with --nccl LATENCY_S BANDWIDTH_BYTES_PER_S from "
            "`benchmarks/kv_transfer.py --nccl`, and until then simulate with --kv-backend "
            + " or ".join(b for b in measured if b != "local")
            + "."
        )
    else:
        lines.append(f"  nccl: given on the command line (--nccl {nccl[0]:g} {nccl[1]:g}), not measured here.")
    return lines


def render(profile: Profile, header: list[str]) -> str:
    """The YAML text: the header as comments, then the profile with short lists and entries on one line."""
    body = yaml.safe_dump(
        _rounded(profile.model_dump(mode="json")), sort_keys=False, default_flow_style=None, width=120
    )
    return "".join(f"# {line}\n" for line in header) + body


def run_profile(
    config_path: str,
    out: str | Path,
    flags: GPUFlags,
    *,
    quick: bool = False,
    nccl: tuple[float, float] | None = None,
    command: str = "splitserve profile",
    tensor_parallel_size: int = 1,
) -> Result:
    """Measure and write the profile. Everything a user can get wrong is checked before the model loads; the file
    is validated with ``load_profile`` before it replaces ``out``."""
    from splitserve.engine.runner import resolve_device

    check_measurable_tp(tensor_parallel_size)
    started = time.perf_counter()
    try:
        config = load_config(config_path)
        device = resolve_device(config.cluster.device.value)
    except (ConfigError, RuntimeError) as err:
        raise SimInputError(str(err)) from None
    if device.type == "cuda" and flags.cost_per_hour is None:
        raise SimInputError("--cost-per-hour: required on a GPU (fix: the price of one GPU-hour, e.g. 2.99)")
    power = PowerSampler(device)
    if device.type == "cuda" and (flags.power_w is None or flags.idle_power_w is None) and power.read() is None:
        raise SimInputError("--power-w/--idle-power-w: NVML gives no power reading here (fix: pass both)")
    idle = power.sample_for(IDLE_SAMPLE_S) if flags.idle_power_w is None else None  # before the model loads
    sweep = QUICK if quick else FULL
    try:
        # At tp > 1 the engine leads its ranks, as a worker's does: every figure is the whole group's, but the KV
        # transfer's, which is one rank's link (the links of a request go in parallel).
        with offline_engine(engine_config_for(config), tensor_parallel_size) as engine:
            with power:
                compute = measure_compute(engine, sweep)
            backends = local_backends(engine.runner.device)
            options = config.kv_transfer.model_dump(exclude={"backend"})
            transfers = measure_kv_transfer(engine, backends, sweep, options)
            header = [
                *_provenance(engine, config, command, quick),
                *_compute_notes(engine, compute, sweep),
                *_transfer_notes(backends, nccl),
            ]
            device = engine.runner.device
    except TensorParallelError as err:
        raise SimInputError(str(err)) from None
    if nccl is not None:
        transfers["nccl"] = TransferSpec(latency_s=nccl[0], bandwidth_bytes_per_s=nccl[1])
    gpu, gpu_notes = _gpu_spec(device, flags, idle, power.median)
    profile = Profile(
        model=config.model.served_name,
        gpu=gpu,
        tensor_parallel_size=tensor_parallel_size,
        kv_bytes_per_token=compute.kv_bytes_per_token,
        kv_capacity_tokens=compute.kv_capacity_tokens,
        prefill=PrefillSpec(tokens=compute.prefill_tokens, seconds=compute.prefill_seconds),
        decode=compute.decode,
        kv_transfer=transfers,
        mixed=compute.mixed,
    )
    header += gpu_notes
    path = Path(out)
    return Result(write_checked(render(profile, header), path), path, time.perf_counter() - started)


def check_measurable_tp(tensor_parallel_size: int) -> None:
    if tensor_parallel_size < 1:
        raise SimInputError(f"--tp: must be >= 1, got {tensor_parallel_size}")


def write_checked(text: str, path: Path) -> Profile:
    """Write ``text`` to ``path`` only if it loads as a profile: a failed run never leaves a broken file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    try:
        checked = load_profile(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return checked


def _provenance(engine: Engine, config: SplitserveConfig, command: str, quick: bool) -> list[str]:
    """When, on what, with which software and which command: what tells two profiles' numbers apart."""
    runner = engine.runner
    graphs = ", CUDA graphs" if runner.graphs is not None else ""
    return [
        f"Measured by `splitserve profile` on {time.strftime('%Y-%m-%d %H:%M %z')}: {describe_device(runner.device)}, "
        f"torch {torch.__version__}, {str(runner.dtype).removeprefix('torch.')}{graphs}, model {config.model.path}.",
        f"  {command}",
        f"Sweep: {'quick (a smoke test: too coarse to plan with)' if quick else 'full'}.",
    ]
