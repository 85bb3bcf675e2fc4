"""Serving benchmark: disaggregated vs colocated (vs HF ``generate`` in static batches) on the same requests.

    python benchmarks/serve.py --config configs/tiny-cpu.yaml --rates 1,2 --num-requests 8 \
        --prompt-len 64 --output-len 16 --hf-baseline

For each mode it starts the cluster of CONFIG in this process (that mode, free ports), sweeps the offered load with
the open-loop generator through the gRPC SDK, and stops it; then, optionally, runs HF transformers on the same
requests on one device. Prints one table and writes JSON (every request) and a PNG (latency CDFs, SLO attainment
per rate) under --out-dir. A mode's max goodput is its best rate at which ≥ 90% of requests meet both SLOs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from splitserve import handoff_trace
from splitserve.bench import cli, handoff_report, report
from splitserve.bench.hf_baseline import run_hf_baseline
from splitserve.bench.local_cluster import sweep_local
from splitserve.bench.requests import WorkloadSpec, make_requests
from splitserve.bench.sweep import SweepResult
from splitserve.config import ConfigError, ServingMode, SplitserveConfig, load_config
from splitserve.engine.resolve import resolve_model_path
from splitserve.simulator.errors import SimInputError
from splitserve.slo import SLO


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="cluster YAML; its mode is overridden by each of --modes")
    p.add_argument("--modes", default="disaggregated,colocated", help="comma-separated serving modes to compare")
    p.add_argument("--hf-baseline", action="store_true", help="also run HF transformers generate on the requests")
    p.add_argument("--hf-batch-size", type=int, default=32, help="static batch size of the HF baseline")
    p.add_argument("--hf-device", choices=["auto", "cpu", "cuda"], help="default: the config's cluster.device")
    cli.add_workload_args(p)
    return p.parse_args(argv)


async def sweep_modes(
    config: SplitserveConfig, modes: list[ServingMode], spec: WorkloadSpec, rates: list[float | None], slo: SLO, args
) -> list[SweepResult]:
    """One mode at a time, so each has the machine to itself."""
    results = []
    for mode in modes:
        results.append(await sweep_local(config, mode, spec, rates, slo, args.warmup, args.timeout))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        modes = [ServingMode(m.strip()) for m in args.modes.split(",") if m.strip()]
        spec, rates = cli.workload_spec(args), cli.parse_rates(args.rates)
    except (ConfigError, SimInputError) as err:
        print(err, file=sys.stderr)
        return 2
    except ValueError:
        print(f"--modes: {args.modes!r} (fix: a comma-separated list of disaggregated, colocated)", file=sys.stderr)
        return 2
    slo = cli.slo_from_args(args, SLO(config.slo.ttft_ms, config.slo.tpot_ms))
    sweeps = asyncio.run(sweep_modes(config, modes, spec, rates, slo, args))

    import ray

    ray.shutdown()  # every worker process gone: the device is the baseline's alone
    baseline = None
    if args.hf_baseline:
        requests = make_requests(spec.workload(rates[0]), sweeps[0].max_model_len, seed=spec.seed)
        model_dir = resolve_model_path(config.model.path)
        baseline = run_hf_baseline(
            model_dir,
            requests,
            args.hf_batch_size,
            slo,
            device=args.hf_device or config.cluster.device.value,
            dtype=config.model.dtype.value,
        )

    out = Path(args.out_dir)
    meta = cli.run_meta(
        args,
        config=args.config,
        device=cli.device_name(config.cluster.device.value),
        model=config.model.path,
        workload=cli.workload_meta(args, spec, rates),
        slo={"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        hf_batch_size=args.hf_batch_size if args.hf_baseline else None,
    )
    trace = handoff_trace.directory()
    if trace is not None:  # SPLITSERVE_HANDOFF_TRACE was set: every disaggregated request's hand-off, summarized
        events = handoff_report.load(Path(trace))
        meta["handoff"] = [{"event": e, "requests": n, **p} for e, n, p in handoff_report.timeline(events)]
        print(handoff_report.format_timeline(events))
    report.write_json(out / "serve.json", meta, sweeps, baseline)
    report.plot(out / "serve.png", sweeps, baseline)
    print(report.format_table(sweeps, None if baseline is None else baseline[0]))
    print(f"wrote {out / 'serve.json'} and {out / 'serve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
