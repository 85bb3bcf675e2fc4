"""``splitserve bench``: sweep a running cluster's load through the gRPC SDK, or (``--multiturn``) replay
multi-turn conversations; also the workload flags that ``benchmarks/serve.py`` and ``benchmarks/multiturn.py``
share, so each reads a workload the same way."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from splitserve.bench.multiturn import MultiTurnSpec, ThinkDist
from splitserve.bench.requests import WorkloadSpec
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.workload import LengthDist
from splitserve.slo import SLO

EXIT_USAGE = 2
DEFAULT_OUT_DIR = "results/serve"


def parse_rates(text: str | None) -> list[float | None]:
    """``1,2,4`` → [1.0, 2.0, 4.0]; none → [None]: one run at a trace's own timing."""
    if not text:
        return [None]
    try:
        rates: list[float | None] = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SimInputError(f"--rates: cannot read {text!r} (fix: comma-separated requests/s, e.g. 1,2,4)") from None
    if not rates or any(r is None or r <= 0 for r in rates):
        raise SimInputError(f"--rates: {text!r} needs positive rates (fix: e.g. --rates 1,2,4)")
    return rates


def add_workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload: Poisson arrivals at each rate, or an Azure trace stretched to it")
    w.add_argument("--rates", metavar="R1,R2,...", help="offered loads in requests/s (a trace alone: its own timing)")
    w.add_argument("--num-requests", type=int, default=64, help="requests per rate (with --trace: its first N rows)")
    w.add_argument("--prompt-len", default="512", help="prompt tokens: N | uniform:LO:HI | lognormal:MEDIAN:SIGMA")
    w.add_argument("--output-len", default="128", help="output tokens: N | uniform:LO:HI | lognormal:MEDIAN:SIGMA")
    w.add_argument(
        "--trace", metavar="CSV", help="Azure LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens)"
    )
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before the first rate")
    w.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take before it counts failed")
    s = p.add_argument_group("SLOs (goodput counts requests meeting both)")
    s.add_argument("--slo-ttft-ms", type=float, help="time to first token target (default 1000, or the config's)")
    s.add_argument("--slo-tpot-ms", type=float, help="time per output token target (default 50, or the config's)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where the JSON and PNG go")


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    if args.num_requests < 1:
        raise SimInputError(f"--num-requests: must be >= 1, got {args.num_requests}")
    if args.trace is None and not args.rates:
        raise SimInputError("--rates: a synthetic workload needs rates (fix: --rates 1,2,4, or --trace CSV)")
    return WorkloadSpec(
        num_requests=args.num_requests,
        prompt=LengthDist.parse(args.prompt_len, "--prompt-len"),
        output=LengthDist.parse(args.output_len, "--output-len"),
        seed=args.seed,
        trace=args.trace,
    )


def slo_from_args(args: argparse.Namespace, default: SLO) -> SLO:
    return SLO(
        ttft_ms=default.ttft_ms if args.slo_ttft_ms is None else args.slo_ttft_ms,
        tpot_ms=default.tpot_ms if args.slo_tpot_ms is None else args.slo_tpot_ms,
    )


def run_meta(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """What the JSON records about the run besides its results."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv, **extra}


def device_name(device: str) -> str:
    """What the run's JSON names as its device: the GPU's model, or the CPU's core count."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core CPU"


def _bench(args: argparse.Namespace) -> int:
    from splitserve.bench import report
    from splitserve.bench.sweep import run_sweep

    try:
        spec, rates = workload_spec(args), parse_rates(args.rates)
    except SimInputError as err:
        print(f"splitserve bench: {err}", file=sys.stderr)
        return EXIT_USAGE
    slo = slo_from_args(args, SLO())
    sweep = asyncio.run(
        run_sweep(
            args.address, spec, rates, slo, args.label, warmup=args.warmup, timeout_s=args.timeout, token=args.token
        )
    )
    out = Path(args.out_dir)
    report.write_json(out / f"{args.label}.json", run_meta(args, address=args.address), [sweep], None)
    report.plot(out / f"{args.label}.png", [sweep], None)
    print(report.format_table([sweep]))
    print(f"wrote {out / args.label}.json and .png")
    return 0


def add_multiturn_args(p: argparse.ArgumentParser) -> None:
    """The multi-turn workload's flags (``--trace`` and ``--seed`` come from ``add_workload_args``)."""
    m = p.add_argument_group("multi-turn workload: conversations from --trace (splitserve/bench/multiturn.py)")
    m.add_argument("--conversations", type=int, default=8, help="conversations running at once")
    m.add_argument("--turns", default="4", help="turns per conversation: N | uniform:LO:HI | lognormal:MEDIAN:SIGMA")
    m.add_argument(
        "--think",
        default="exponential:5",
        help="seconds between an answer and the next turn: S | exponential:MEAN | uniform:LO:HI",
    )
    m.add_argument(
        "--followup-fraction",
        type=float,
        default=0.1,
        help="a follow-up message's length as a share of a trace prompt's (the first turn's is a whole prompt)",
    )


def multiturn_spec(args: argparse.Namespace) -> MultiTurnSpec:
    if args.trace is None:
        raise SimInputError(
            "--trace: the multi-turn workload draws its lengths from a trace (fix: --trace "
            "AzureLLMInferenceTrace_conv.csv)"
        )
    return MultiTurnSpec(
        trace=args.trace,
        conversations=args.conversations,
        turns=LengthDist.parse(args.turns, "--turns"),
        think=ThinkDist.parse(args.think, "--think"),
        followup_fraction=args.followup_fraction,
        seed=args.seed,
    )


def multiturn_meta(spec: MultiTurnSpec, max_context: int) -> dict[str, Any]:
    return {**asdict(spec), "max_context": max_context}


def _bench_multiturn(args: argparse.Namespace) -> int:
    from splitserve.bench import multiturn_report
    from splitserve.bench.multiturn import build_conversations
    from splitserve.bench.multiturn_load import max_context, replay_at

    try:
        spec = multiturn_spec(args)
        context = asyncio.run(max_context(args.address, args.token))
        conversations = build_conversations(spec, context)
    except SimInputError as err:
        print(f"splitserve bench: {err}", file=sys.stderr)
        return EXIT_USAGE
    replay = asyncio.run(replay_at(args.address, conversations, args.timeout, args.token))
    runs = [multiturn_report.PolicyRun(args.label, replay.duration_s, replay.records)]
    path = Path(args.out_dir) / f"{args.label}-multiturn.json"
    meta = run_meta(args, address=args.address, workload=multiturn_meta(spec, context))
    multiturn_report.write_json(path, meta, runs)
    print(multiturn_report.format_table(runs))
    print(f"wrote {path}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``bench`` to the main CLI's subparsers."""
    p = subparsers.add_parser("bench", help="run the serving benchmark (a load sweep) against a running cluster")
    p.add_argument("--address", required=True, help="the cluster's gRPC address, HOST:PORT")
    p.add_argument("--token", help="bearer token, if the cluster requires one")
    p.add_argument("--label", default="cluster", help="name of this system in the table and the output files")
    p.add_argument(
        "--multiturn", action="store_true", help="replay multi-turn conversations (per-turn report) instead of a sweep"
    )
    add_workload_args(p)
    add_multiturn_args(p)
    p.set_defaults(func=_bench_command)


def _bench_command(args: argparse.Namespace) -> int:
    return _bench_multiturn(args) if args.multiturn else _bench(args)


def workload_meta(args: argparse.Namespace, spec: WorkloadSpec, rates: list[float | None]) -> dict[str, Any]:
    """The workload as the JSON reports record it."""
    return {
        "num_requests": spec.num_requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "trace": spec.trace,
        "seed": spec.seed,
        "rates": rates,
    }
