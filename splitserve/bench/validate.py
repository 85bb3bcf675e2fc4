"""Simulator validation: one workload replayed on a real cluster and in the simulator with a measured profile.

    python benchmarks/sim_validate.py --config CONFIG --profile PROFILE --rates 1,2 --num-requests 64

For each rate the cluster of CONFIG (started in this process, as ``benchmarks/serve.py`` does) serves the requests
of the workload flags; the simulator then replays the very same requests (arrivals, prompt and output lengths after
clipping to the model's context) on a ``ClusterSpec`` mapped from CONFIG. Prints measured vs predicted TTFT and TPOT
p50/p90 and output tokens/s with predicted/measured ratios, and writes every figure as JSON. Goal: within 10%.

With ``--measured FILE`` (a ``sim_validate.json`` written earlier) no cluster starts: the run's config, workload and
rates are read from FILE, and its measured figures are predicted again with ``--profile``, so a new profile or
simulator can be checked against a GPU run on a machine with no GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np

from splitserve.bench import step_report
from splitserve.bench.cli import (
    add_workload_args,
    device_name,
    parse_rates,
    run_meta,
    slo_from_args,
    workload_meta,
    workload_spec,
)
from splitserve.bench.local_cluster import sweep_local
from splitserve.bench.metrics import RequestRecord, Summary
from splitserve.bench.requests import BenchRequest, WorkloadSpec, make_requests
from splitserve.bench.serving_fit import fit_serving
from splitserve.bench.sweep import RateRun, SweepResult
from splitserve.config import ConfigError, Device, KVBackend, ServingMode, SplitserveConfig, load_config
from splitserve.engine import step_trace
from splitserve.engine.step_trace import StepRecord
from splitserve.simulator import ClusterSpec, PoolSpec, Profile, Workload, load_profile, simulate, summarize
from splitserve.simulator.cli import cluster_dict
from splitserve.simulator.cluster import Policy
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.metrics import Metrics
from splitserve.simulator.profile_run import render, write_checked
from splitserve.slo import SLO

GOAL = 0.10  # predicted within 10% of measured
DEFAULT_OUT_DIR = "results/sim_validate"
METRICS = ("ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "throughput_tok_s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", help="cluster YAML, run live and mapped to the simulator's cluster (required unless --measured)"
    )
    p.add_argument("--profile", required=True, help="profile YAML measured by `splitserve profile CONFIG --out PATH`")
    p.add_argument("--mode", choices=[m.value for m in ServingMode], help="serving mode (default: the config's)")
    p.add_argument(
        "--measured",
        metavar="FILE",
        help="re-predict the live figures of an earlier sim_validate.json with --profile (no cluster started; the "
        "config, mode, workload and rates come from FILE, so --config may be anything)",
    )
    p.add_argument(
        "--fit-serving",
        action="store_true",
        help="fit the profile's serving overheads (per request, per step) on the first rate's live run, predict "
        "every rate with them, and write the fitted profile next to the JSON (make the first rate a low one)",
    )
    p.add_argument(
        "--step-trace",
        metavar="DIR",
        default=step_trace.directory(),
        help="the run's step trace (default: $SPLITSERVE_STEP_TRACE, which a live run's workers then write): each "
        "rate's served steps are set beside the profile's step prices, and --fit-serving fits the served floor of a "
        "step with a prompt chunk on the first rate's (with --measured: the trace of that run)",
    )
    add_workload_args(p)
    p.set_defaults(out_dir=DEFAULT_OUT_DIR)
    args = p.parse_args(argv)
    if args.measured is None and args.config is None:
        p.error("--config is required (or --measured FILE, to re-predict an earlier run)")
    return args


def measured_sweep(path: str) -> tuple[argparse.Namespace, SweepResult, str]:
    """An earlier run's arguments (as given then), its measured summaries and its device, from its
    sim_validate.json."""
    try:
        saved = json.loads(Path(path).read_text())
        then = parse_args(saved["argv"][1:])
        if then.measured is not None:
            raise SimInputError(
                f"--measured: {path} is itself a re-prediction (fix: pass the live run's file, {then.measured})"
            )
        runs = [
            RateRun(
                Summary(**{**run["measured"], "slo": SLO(**run["measured"]["slo"])}),
                [RequestRecord(**record) for record in run.get("records", [])],
                tuple(run.get("clock_s", (0.0, 0.0))),
            )
            for run in saved["runs"]
        ]
        sweep = SweepResult(saved["mode"], int(saved["workload"]["max_model_len"]), runs)
        device = str(saved["device"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SimInputError(
            f"--measured: {path} is not a sim_validate.json this version reads ({type(err).__name__}: {err}) "
            "(fix: pass the sim_validate.json of a run of benchmarks/sim_validate.py)"
        ) from None
    return then, sweep, device


def cluster_spec(config: SplitserveConfig, mode: ServingMode, profile: Profile) -> ClusterSpec:
    """The simulator's view of ``config`` in ``mode``, with the limits the workers get (``options_for``): colocated
    is the decode pool alone, chunking prompts by the prefill budget; ``auto`` KV is what it picks between Ray
    actors (tcp on CPU, nccl on GPUs); the hybrid pool joins a disaggregated cluster; steps overlap where the engine
    overlaps them (on CUDA, unless the pool turns it off)."""
    batch_tokens, batch_size = config.prefill.max_batch_tokens, config.decode.max_batch_size
    on_gpu = config.cluster.device != Device.cpu
    decode = PoolSpec(
        config.decode.replicas,
        profile,
        max_batch_tokens=batch_tokens,
        max_batch_size=batch_size,
        overlap_decode=on_gpu and config.decode.overlap_decode,
    )
    backend = config.kv_transfer.backend
    if backend == KVBackend.auto:
        backend = KVBackend.tcp if config.cluster.device == Device.cpu else KVBackend.nccl
    policy = cast(Policy, config.router.policy.value)  # the same three names
    if mode == ServingMode.colocated:
        return ClusterSpec("colocated", prefill=decode, policy=policy, kv_backend=backend.value)
    prefill = PoolSpec(config.prefill.replicas, profile, max_batch_tokens=batch_tokens, max_batch_size=batch_size)
    mixed = config.hybrid
    overflow = (
        PoolSpec(
            mixed.replicas,
            profile,
            max_batch_tokens=mixed.max_batch_tokens,
            max_batch_size=mixed.max_batch_size,
            overlap_decode=on_gpu and mixed.overlap_decode,
        )
        if mixed.replicas
        else None
    )
    # Fractional pools that whole GPUs could not hold apart share them: one prefill and one decode worker a GPU. A
    # worker holds a GPU per rank of its group (``gpus_per_worker``).
    apart = sum(pool.replicas * math.ceil(pool.gpus_per_worker) for pool in (config.prefill, config.decode))
    shared = (
        on_gpu
        and overflow is None
        and config.prefill.replicas == config.decode.replicas
        and config.cluster.total_gpus is not None
        and apart > config.cluster.total_gpus
    )
    return ClusterSpec(
        "disaggregated",
        prefill=prefill,
        decode=decode,
        policy=policy,
        kv_backend=backend.value,
        hybrid=overflow,
        shared_gpus=shared,
    )


def as_workload(requests: Sequence[BenchRequest]) -> Workload:
    """The requests the cluster was sent, as the simulator's workload (lengths after clipping to the context)."""
    return Workload(
        np.asarray([r.arrival_s for r in requests], dtype=np.float64),
        np.asarray([len(r.prompt_token_ids) for r in requests], dtype=np.int64),
        np.asarray([r.max_tokens for r in requests], dtype=np.int64),
    )


def measured_figures(s: Summary) -> dict[str, float | None]:
    return {
        "ttft_p50_ms": s.ttft_ms["p50"],
        "ttft_p90_ms": s.ttft_ms["p90"],
        "tpot_p50_ms": s.tpot_ms["p50"],
        "tpot_p90_ms": s.tpot_ms["p90"],
        "throughput_tok_s": s.throughput_tok_s,
    }


def predicted_figures(m: Metrics) -> dict[str, float | None]:
    return _finite(
        {
            "ttft_p50_ms": m.ttft_s.p50 * 1e3,
            "ttft_p90_ms": m.ttft_s.p90 * 1e3,
            "tpot_p50_ms": m.tpot_s.p50 * 1e3,
            "tpot_p90_ms": m.tpot_s.p90 * 1e3,
            "throughput_tok_s": m.output_tokens_per_s,
        }
    )


def _finite(x: Any) -> Any:
    """NaN (no sample, e.g. TPOT when every output is one token) as None, so the JSON is standard."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def compare(measured: dict[str, float | None], predicted: dict[str, float | None]) -> dict[str, Any]:
    """Per metric: both figures, predicted/measured, and whether that is within the goal (None: not comparable)."""
    out = {}
    for k in METRICS:
        m, p = measured[k], predicted[k]
        ratio = p / m if m is not None and p is not None and m > 0 else None
        out[k] = {
            "measured": m,
            "predicted": p,
            "ratio": ratio,
            "within_goal": None if ratio is None else abs(ratio - 1) <= GOAL,
        }
    return out


def validate_rate(
    cluster: ClusterSpec, spec: WorkloadSpec, rate: float | None, run: RateRun, max_model_len: int, slo: SLO
) -> dict[str, Any]:
    """Simulate the requests the live run at ``rate`` sent (rebuilt as ``run_sweep`` built them) and compare; with
    the run's request records, each request's measured and predicted TTFT and TPOT side by side as well."""
    requests = make_requests(spec.workload(rate), max_model_len, seed=spec.seed)  # lengths and arrivals: as run
    result = simulate(cluster, as_workload(requests))
    metrics = summarize(result, slo)
    row = {
        "rate": run.summary.rate,
        "metrics": compare(measured_figures(run.summary), predicted_figures(metrics)),
        "measured": run.summary.to_json(),
        "predicted": _finite(metrics.to_dict()),
        "clock_s": list(run.clock_s),
    }
    if run.records:
        ttft = (result.first_token_s - result.workload.arrival_s) * 1e3
        decoded = result.workload.output_tokens - 1
        tpot = np.where(decoded > 0, (result.finish_s - result.first_token_s) * 1e3 / np.maximum(decoded, 1), np.nan)
        row["records"] = [asdict(record) for record in run.records]
        row["predicted_per_request"] = _finite({"ttft_ms": ttft.tolist(), "tpot_ms": tpot.tolist()})
    return row


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per rate: measured / predicted (ratio) for each metric."""
    heads = ["TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "TPOT p90 ms", "out tok/s"]
    cells = [["rate", *heads]]
    for row in rows:
        line = [_fmt(row["rate"], "g")]
        for k in METRICS:
            c = row["metrics"][k]
            mark = "" if c["within_goal"] is None else (" ok" if c["within_goal"] else " !")
            line.append(
                f"{_fmt(c['measured'], '.1f')} / {_fmt(c['predicted'], '.1f')} ({_fmt(c['ratio'], '.2f')}{mark})"
            )
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    note = f"measured / predicted (predicted/measured; ok: within {GOAL:.0%})"
    return "\n".join([note, *lines])


def _served_steps(rows: list[dict[str, Any]], steps: Sequence[StepRecord], profile: Profile) -> list[tuple[float, str]]:
    """With a step trace, each rate's served steps beside the profile's prices, into its row (``steps``); the
    tables to print."""
    tables: list[tuple[float, str]] = []
    if not steps:
        return tables
    for row in rows:
        groups = step_report.compare(step_report.within(steps, *row["clock_s"]), profile)
        row["steps"] = step_report.to_json(groups)
        tables.append((row["rate"], step_report.format_table(groups)))
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sweep: SweepResult | None = None
    try:
        run_args, device = args, ""
        if args.measured is not None:
            run_args, sweep, device = measured_sweep(args.measured)
        config = load_config(run_args.config)
        device = device or device_name(config.cluster.device.value)
        mode = ServingMode(run_args.mode) if run_args.mode else config.mode
        profile = load_profile(args.profile)
        cluster = cluster_spec(config, mode, profile)
        spec, rates = workload_spec(run_args), parse_rates(run_args.rates)
    except (ConfigError, SimInputError) as err:
        print(err, file=sys.stderr)
        return 2
    slo = slo_from_args(run_args, SLO(config.slo.ttft_ms, config.slo.tpot_ms))
    if sweep is None:
        sweep = asyncio.run(sweep_local(config, mode, spec, rates, slo, args.warmup, args.timeout))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = step_trace.load(args.step_trace) if args.step_trace else []
    if args.fit_serving:
        first = as_workload(make_requests(spec.workload(rates[0]), sweep.max_model_len, seed=spec.seed))
        serving = fit_serving(
            lambda p: cluster_spec(config, mode, p),
            profile,
            first,
            measured_figures(sweep.runs[0].summary),
            slo,
            step_report.within(steps, *sweep.runs[0].clock_s),
            trace_start_s=sweep.runs[0].clock_s[0],
        )
        fitted = out_dir / "profile_fitted.yaml"
        note = (
            f"{args.profile} with serving overheads fitted by sim_validate on {run_args.config}, "
            f"rate {rates[0]:g} ({device})"
        )
        # Predict with the profile as written (rounded to the file's precision), so the two agree.
        profile = write_checked(render(profile.model_copy(update={"serving": serving}), [note]), fitted)
        cluster = cluster_spec(config, mode, profile)
        print(
            f"serving overheads fitted on rate {rates[0]:g}: {serving.request_s * 1e3:.1f} ms per request after an "
            f"ingress of {serving.ingress_s * 1e3:.1f} ms, "
            f"{serving.prompt_token_s * 1e6:.1f} us per prompt token, {serving.step_s * 1e3:.2f} ms per step, "
            f"a step with a prompt chunk at least {serving.prompt_step_floor_s * 1e3:.1f} ms; wrote {fitted}"
        )
    rows = [
        validate_rate(cluster, spec, rate, run, sweep.max_model_len, slo)
        for rate, run in zip(rates, sweep.runs, strict=True)
    ]
    step_tables = _served_steps(rows, steps, profile)

    out = out_dir / "sim_validate.json"
    meta = run_meta(
        args,
        argv=sys.argv if argv is None else ["sim_validate.py", *argv],
        config=run_args.config,
        profile=args.profile,
        measured_from=args.measured,
        device=device,
        model=config.model.path,
        mode=mode.value,
        cluster=cluster_dict(cluster),
        workload={**workload_meta(run_args, spec, rates), "max_model_len": sweep.max_model_len},
        slo={"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        goal={"max_relative_error": GOAL},
        serving_fitted_on_rate=rates[0] if args.fit_serving else None,
        serving=profile.serving.model_dump(),
    )
    out.write_text(json.dumps({**meta, "runs": rows}, indent=2))
    print(format_table(rows))
    for rate, table in step_tables:
        print(f"served steps at rate {rate:g} against the profile's step prices:\n{table}")
    print(f"wrote {out}")
    return 0
