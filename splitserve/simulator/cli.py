"""``splitserve simulate``, ``splitserve plan``, ``splitserve profile`` (which measures the profiles the other two
read) and ``splitserve derive-profile`` (which predicts a tensor-parallel one from a measured one): argument parsing
and printing only; the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from splitserve.bench.cli import add_multiturn_args, multiturn_spec
from splitserve.simulator.cluster import POLICIES, ClusterSpec, PoolSpec, check_policy
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.planner import CHUNKS
from splitserve.simulator.profile import Profile, load_profile, load_profiles
from splitserve.simulator.workload import LengthDist, Workload, load_trace, multiturn, synthetic
from splitserve.slo import SLO

EXIT_USAGE = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        action="append",
        required=True,
        metavar="PATH",
        help="profile YAML (configs/profiles/); repeat to give the decode pool (simulate) or more GPU types and "
        "TP degrees to choose from (plan, which also takes a directory: every *.yaml in it)",
    )
    w = p.add_argument_group("workload: a trace, or synthetic")
    w.add_argument(
        "--trace", metavar="CSV", help="Azure LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens)"
    )
    w.add_argument("--rate", type=float, help="requests/s (synthetic; with --trace: time-stretch the trace to it)")
    w.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    w.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma inter-arrivals")
    w.add_argument("--prompt-len", default="lognormal:1000:0.6", help="N | uniform:LO:HI | lognormal:MEDIAN:SIGMA")
    w.add_argument("--output-len", default="lognormal:200:0.6", help="N | uniform:LO:HI | lognormal:MEDIAN:SIGMA")
    w.add_argument("--num-requests", type=int, default=5000, help="synthetic count, or the first N rows of --trace")
    w.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--multiturn",
        action="store_true",
        help="a workload of conversations from --trace (the multi-turn benchmark's, docs/multiturn.md): prefix "
        "caches, incremental KV transfer, a per-turn report; --rate and --num-requests do not apply",
    )
    add_multiturn_args(p)
    p.add_argument(
        "--max-context", type=int, default=8192, help="with --multiturn: the model's context length (prompt + answer)"
    )
    c = p.add_argument_group("cluster")
    c.add_argument(
        "--full-transfer",
        action="store_true",
        help="with --multiturn: every KV transfer moves the whole prompt (no incremental transfer), as the runtime "
        "does without a prefix cache",
    )
    c.add_argument(
        "--decode-prefix-weight",
        type=float,
        default=ClusterSpec.decode_prefix_weight,
        help="cache_aware: a token of a conversation's KV a decode worker holds counts as this many tokens of load",
    )
    c.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=ClusterSpec.local_prefill_max_tokens,
        help="cache_aware: a turn whose decode worker holds all but at most this many of its prompt tokens is "
        "prefilled there and moves no KV, as router.local_prefill_max_tokens (0: every turn split)",
    )
    c.add_argument(
        "--router",
        default="jsq",
        metavar="{" + ",".join(POLICIES) + "}",
        help="as router.policy: borrow_idle lets an idle decode worker prefill while prefill is backed up; "
        "cache_aware places a conversation's turn where its prefix is cached (--multiturn)",
    )
    c.add_argument("--kv-backend", default="nccl", help="a kv_transfer entry of the profile")
    c.add_argument(
        "--max-batch-tokens",
        type=int,
        default=8192,
        help="prefill batch token budget (simulate --mode colocated: the step's; plan searches it over --chunk-sizes)",
    )
    c.add_argument("--max-batch-size", type=int, default=256, help="decode sequences per step")
    s = p.add_argument_group("SLOs")
    s.add_argument("--ttft-ms", type=float, default=1000.0)
    s.add_argument("--tpot-ms", type=float, default=50.0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot-dir", metavar="DIR", help="write PNG plots here")


def register(subparsers: Any) -> None:
    """Add ``simulate``, ``plan``, ``profile`` and ``derive-profile`` to the main CLI's subparsers."""
    sim = subparsers.add_parser("simulate", help="simulate one cluster configuration under a workload")
    _add_common(sim)
    sim.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    sim.add_argument("--prefill", type=int, default=1, help="prefill replicas (colocated: the colocated replicas)")
    sim.add_argument("--decode", type=int, default=1, help="decode replicas")
    sim.add_argument(
        "--hybrid",
        type=int,
        default=0,
        help="hybrid-pool replicas (disaggregated): decode workers that run whole requests while prefill is backed up",
    )
    sim.add_argument("--mixed", help=argparse.SUPPRESS)  # the hybrid pool's old name: an error naming the new one
    sim.add_argument(
        "--shared-gpus",
        action="store_true",
        help="one prefill and one decode replica per GPU (fractional gpus_per_replica); each slowed beside the other "
        "as the profile's serving.shared_gpu_slowdown and shared_gpu_prefill_slowdown say",
    )
    sim.set_defaults(func=_guarded(_simulate))
    pl = subparsers.add_parser("plan", help="find the cheapest prefill/decode pool sizes that meet the SLOs")
    _add_common(pl)
    pl.add_argument("--max-gpus", type=int, default=8)
    pl.add_argument("--target", type=float, default=0.9, help="SLO attainment to reach (fraction of requests)")
    pl.add_argument("--modes", default="disaggregated,colocated", help="comma-separated modes to compare")
    pl.add_argument(
        "--chunk-sizes",
        default=",".join(map(str, CHUNKS)),
        metavar="N1,N2,...",
        help="colocated step token budgets (chunk sizes) to search (default %(default)s)",
    )
    pl.add_argument("--sweep-rates", metavar="R1,R2,...", help="also sweep load on the best clusters (goodput vs load)")
    pl.set_defaults(func=_guarded(_plan))
    _register_profile(subparsers)
    _register_derive(subparsers)


def _register_profile(subparsers: Any) -> None:
    pr = subparsers.add_parser(
        "profile", help="measure this machine's GPU (or CPU) running a config's model into a profile YAML"
    )
    pr.add_argument(
        "config", help="cluster config: its model, dtype, device, prefill batch budget and decode KV cache are measured"
    )
    pr.add_argument("--out", required=True, metavar="YAML", help="where to write it, e.g. configs/profiles/NAME.yaml")
    pr.add_argument("--quick", action="store_true", help="a small sweep (seconds on CPU): a smoke test, not for plans")
    pr.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="tensor-parallel ranks of the measured worker (N GPUs on CUDA, N gloo processes on CPU), recorded as "
        "tensor_parallel_size; its kv_transfer figures are one rank's link",
    )
    g = pr.add_argument_group("the gpu entry (default: measured where possible)")
    g.add_argument(
        "--gpu-name", help="default: the CUDA device's name, lower-cased and dashed (h100-80gb-hbm3), or cpu"
    )
    g.add_argument("--cost-per-hour", type=float, help="$ per GPU-hour; required on a GPU (default 0 on CPU)")
    g.add_argument("--power-w", type=float, help="watts while busy (default: NVML's median while measuring; 1 on CPU)")
    g.add_argument("--idle-power-w", type=float, help="idle watts (default: NVML's median before loading; 0 on CPU)")
    pr.add_argument(
        "--nccl",
        nargs=2,
        type=float,
        metavar=("LATENCY_S", "BANDWIDTH_BYTES_PER_S"),
        help="an nccl kv_transfer entry measured elsewhere (benchmarks/kv_transfer.py --nccl, two GPUs): "
        "one process cannot measure it",
    )
    pr.set_defaults(func=_guarded(_profile))


def _register_derive(subparsers: Any) -> None:
    de = subparsers.add_parser(
        "derive-profile",
        help="derive a tensor-parallel profile from a measured tp=1 one, to plan with before measuring it",
        description="Writes a profile marked derived_from (never measured): see splitserve/simulator/tp_derive.py "
        "for the model. The shape and link figures are assumptions the file records.",
    )
    de.add_argument("profile", metavar="PROFILE", help="the measured tensor_parallel_size 1 profile YAML")
    de.add_argument("--tp", type=int, required=True, metavar="N", help="tensor_parallel_size of the derived worker")
    de.add_argument("--out", required=True, metavar="YAML", help="where to write it, e.g. configs/profiles/NAME.yaml")
    m = de.add_argument_group("the model's shape (its config.json)")
    m.add_argument("--layers", type=int, required=True, help="num_hidden_layers")
    m.add_argument("--hidden-size", type=int, required=True, help="hidden_size")
    m.add_argument("--kv-heads", type=int, required=True, help="num_key_value_heads")
    m.add_argument("--weight-bytes", type=float, required=True, help="bytes of the weights (parameters x dtype bytes)")
    m.add_argument("--activation-bytes", type=int, default=2, help="bytes per activation element (2: bf16)")
    a = de.add_argument_group("assumed, not measured")
    a.add_argument("--link-latency-s", type=float, required=True, help="fixed cost of one all-reduce between the ranks")
    a.add_argument("--link-bandwidth", type=float, required=True, help="all-reduce bus bandwidth, bytes/s")
    a.add_argument(
        "--prefill-efficiency",
        type=float,
        default=0.9,
        help="share of the ideal tp-fold speed-up of a compute-bound prefill pass (default 0.9)",
    )
    de.set_defaults(func=_guarded(_derive))


def _derive(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from splitserve.simulator.profile import TPScaling
    from splitserve.simulator.profile_run import render, write_checked
    from splitserve.simulator.tp_derive import derive_tp, header

    fields = ("layers", "hidden_size", "kv_heads", "weight_bytes", "activation_bytes", "prefill_efficiency")
    try:
        scaling = TPScaling(
            **{f: getattr(args, f) for f in fields},
            link_latency_s=args.link_latency_s,
            link_bandwidth_bytes_per_s=args.link_bandwidth,
        )
    except ValidationError as err:
        first = err.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-").replace("-bytes-per-s", "")
        raise SimInputError(f"{flag}: {first['msg']}") from None
    derived = derive_tp(load_profile(args.profile), args.tp, scaling, args.profile)
    words = ["splitserve", "derive-profile", args.profile, "--tp", str(args.tp), "--out", args.out]
    for f in (*fields, "link_latency_s", "link_bandwidth"):
        words += ["--" + f.replace("_", "-"), f"{getattr(args, f):g}"]
    path = Path(args.out)
    written = write_checked(render(derived, header(derived, shlex.join(words))), path)
    d = written.decode
    print(
        f"wrote {path} (derived, tp={written.tensor_parallel_size}): prefill {written.prefill.tokens[-1]} tokens "
        f"{written.prefill.seconds[-1] * 1e3:.1f} ms; decode step {d.base_s * 1e3:.2f} ms + "
        f"{d.per_seq_s * 1e6:.1f} us/seq + {d.per_context_token_s * 1e9:.2f} ns/context token; KV "
        f"{written.kv_capacity_tokens} tokens"
    )
    return 0


def _guarded(fn):  # type: ignore[no-untyped-def]
    """Bad input is a one-line message and exit 2, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except SimInputError as err:
            print(f"splitserve: {err}", file=sys.stderr)
            return EXIT_USAGE

    return run


def _workload(args: argparse.Namespace) -> Workload:
    if args.multiturn:
        from splitserve.bench.multiturn import draw_lengths

        _positive(args, "--max-context")
        conversations = draw_lengths(multiturn_spec(args), args.max_context)
        return multiturn([[(t.message, t.answer, t.think_s) for t in turns] for turns in conversations if turns])
    if args.rate is not None and not args.rate > 0:
        raise SimInputError(f"--rate: must be > 0, got {args.rate} (fix: pass requests per second, e.g. --rate 10)")
    if args.trace:
        wl = load_trace(args.trace, limit=args.num_requests)
        return wl.at_rate(args.rate) if args.rate else wl
    if args.rate is None:
        raise SimInputError("--rate: required for a synthetic workload (fix: --rate 10, or give --trace CSV)")
    return synthetic(
        rate=args.rate,
        num_requests=args.num_requests,
        arrival=args.arrival,
        cv=args.cv,
        seed=args.seed,
        prompt=LengthDist.parse(args.prompt_len, "--prompt-len"),
        output=LengthDist.parse(args.output_len, "--output-len"),
    )


def _positive(args: argparse.Namespace, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if not value > 0:
            raise SimInputError(f"{flag}: must be > 0, got {value}")


def _cluster(
    args: argparse.Namespace, profiles: list[Profile], mode: str, n_prefill: int, n_decode: int, n_hybrid: int = 0
) -> ClusterSpec:
    """The last profile runs the decode (and hybrid) pool."""
    limits = {"max_batch_tokens": args.max_batch_tokens, "max_batch_size": args.max_batch_size}
    return ClusterSpec(
        mode=mode,  # type: ignore[arg-type]
        prefill=PoolSpec(n_prefill, profiles[0], **limits),
        decode=PoolSpec(n_decode, profiles[-1], **limits),
        policy=args.router,
        kv_backend=args.kv_backend,
        incremental_transfer=not args.full_transfer,
        decode_prefix_weight=args.decode_prefix_weight,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        hybrid=PoolSpec(n_hybrid, profiles[-1], **limits) if n_hybrid else None,
    )


def _inputs(args: argparse.Namespace) -> tuple[list[tuple[Path, Profile]], Workload, SLO]:
    _positive(args, "--ttft-ms", "--tpot-ms", "--max-batch-tokens", "--max-batch-size", "--num-requests")
    check_policy(args.router, "--router")
    return load_profiles(args.profile), _workload(args), SLO(args.ttft_ms, args.tpot_ms)


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=float))


def _simulate(args: argparse.Namespace) -> int:
    from splitserve.simulator.engine import simulate
    from splitserve.simulator.metrics import summarize
    from splitserve.simulator.planner import Evaluated, table

    files, wl, slo = _inputs(args)
    if len(files) > 2:
        raise SimInputError(
            f"--profile: simulate takes one profile, or two (prefill, then decode), got {len(files)} "
            "(fix: plan chooses among more)"
        )
    profiles = [prof for _, prof in files]
    if args.mixed is not None:
        raise SimInputError(f"--mixed: the mixed pool is now called the hybrid pool (fix: --hybrid {args.mixed})")
    if args.hybrid < 0:
        raise SimInputError(f"--hybrid: must be >= 0, got {args.hybrid}")
    cluster = replace(
        _cluster(args, profiles, args.mode, args.prefill, args.decode, args.hybrid), shared_gpus=args.shared_gpus
    )
    result = simulate(cluster, wl)
    m = summarize(result, slo)
    print(table([Evaluated(cluster, m, True)]))
    print(
        f"\n{m.requests} requests over {m.makespan_s:.1f} s: {m.output_tokens_per_s:.0f} output tok/s, "
        f"{m.requests_per_s:.2f} req/s, goodput {m.goodput_rps:.2f} req/s, TTFT p50/p99 "
        f"{m.ttft_s.p50 * 1e3:.1f}/{m.ttft_s.p99 * 1e3:.1f} ms, TPOT p50/p99 {m.tpot_s.p50 * 1e3:.1f}/"
        f"{m.tpot_s.p99 * 1e3:.1f} ms, utilisation " + ", ".join(f"{k} {v:.0%}" for k, v in m.utilisation.items())
    )
    payload: dict[str, Any] = {"cluster": cluster_dict(cluster), "metrics": m.to_dict()}
    if args.multiturn:
        from splitserve.simulator.turns import format_turns, per_turn

        turns = per_turn(result)
        print("\nper turn (prefill tokens computed, prefix hit rate and KV moved per request, means):")
        print(format_turns(turns))
        payload["per_turn"] = [t.to_dict() for t in turns]
    _write_json(args.json, payload)
    if args.plot_dir:
        from splitserve.simulator.plots import latency_cdfs

        print("wrote", latency_cdfs({args.mode: result}, Path(args.plot_dir) / "latency_cdf.png"))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from splitserve.simulator.engine import simulate
    from splitserve.simulator.planner import describe, max_goodput_per_gpu, plan, sweep_load, table

    _positive(args, "--max-gpus", "--target")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("disaggregated", "colocated") for m in modes):
        raise SimInputError(f"--modes: {args.modes!r} (fix: disaggregated, colocated or both, comma-separated)")
    if args.max_gpus < 2 and "disaggregated" in modes:
        raise SimInputError("--max-gpus: disaggregated needs at least 2 GPUs (fix: --max-gpus 2 or more)")
    rates = _rates(args.sweep_rates)
    if rates and args.multiturn:
        raise SimInputError(
            "--sweep-rates: a conversation workload's load is set by --conversations and --think, not a rate "
            "(fix: drop --sweep-rates, or plan once per --conversations)"
        )
    chunks = _chunks(args.chunk_sizes)
    files, wl, slo = _inputs(args)
    profiles = [prof for _, prof in files]
    template = _cluster(args, profiles, modes[0], 1, 1)
    result = plan(template, profiles, wl, slo, max_gpus=args.max_gpus, target=args.target, modes=modes, chunks=chunks)
    best = result.recommended
    load = f"{args.conversations} conversations" if args.multiturn else f"offered load {wl.rate:.2f} req/s"
    print(
        f"{load}, {len(wl)} requests, target SLO attainment {args.target:.0%} "
        f"(TTFT <= {args.ttft_ms:g} ms, TPOT <= {args.tpot_ms:g} ms), at most {args.max_gpus} GPUs\n"
    )
    print("profiles (a worker of TP N uses N GPUs):")
    for path, prof in files:
        print(f"  {path}: {_profile_line(prof)}")
    print("\nbest per mode:")
    print(table(list(result.best.values())) if result.best else "  none")
    if best:
        chunk = best.cluster.prefill.max_batch_tokens
        print(
            f"\nrecommended: {describe(best.cluster)} ({best.cluster.mode}"
            + (f", chunk {chunk}: prefill.max_batch_tokens {chunk}" if best.cluster.mode == "colocated" else "")
            + f"; {best.cluster.gpus} GPU{'' if best.cluster.gpus == 1 else 's'}, ${best.cluster.cost_per_hour:.2f}/h)"
        )
    else:
        print(f"\nno configuration within --max-gpus {args.max_gpus} meets the target")
    if any(prof.derived for prof in profiles):
        print("* a derived profile: predicted from a measured one, not measured (see its derived_from)")
    print(f"\ncheapest per layout ({len(result.layouts)} layouts meet the target):")
    print(table(result.layouts) if result.layouts else "  none")
    print(
        f"\nall {len(result.tried)} configurations tried within --max-gpus (cheapest first; {result.runs} simulations, "
        "bounds beyond --max-gpus included):"
    )
    print(table(result.tried))

    def entry(e: Any) -> dict:
        return {"cluster": cluster_dict(e.cluster), "metrics": e.metrics.to_dict(), "feasible": e.feasible}

    payload: dict[str, Any] = {
        "profiles": [{"path": str(path), **_profile_dict(prof)} for path, prof in files],
        "recommended": cluster_dict(best.cluster) if best else None,
        "best": {k: entry(e) for k, e in result.best.items()},
        "layouts": [entry(e) for e in result.layouts],
        "tried": [entry(e) for e in result.tried],
        "simulations": result.runs,
    }
    curves = {}
    if rates and result.best:
        for mode, ev in result.best.items():
            curves[f"{mode}: {describe(ev.cluster)}"] = points = sweep_load(ev.cluster, wl, rates, slo)
            top = max_goodput_per_gpu(points)
            per_gpu = top.metrics.goodput_rps / top.metrics.gpus
            print(f"\n{mode}: max goodput/GPU {per_gpu:.2f} req/s at {top.rate:g} req/s offered")
        payload["sweep"] = {k: [{"rate": p.rate, "metrics": p.metrics.to_dict()} for p in v] for k, v in curves.items()}
    _write_json(args.json, payload)
    if args.plot_dir and result.best:
        from splitserve.simulator.plots import goodput_vs_load, latency_cdfs

        d = Path(args.plot_dir)
        runs_by_name = {f"{m}: {describe(e.cluster)}": simulate(e.cluster, wl) for m, e in result.best.items()}
        print("wrote", latency_cdfs(runs_by_name, d / "latency_cdf.png"))
        if curves:
            print("wrote", goodput_vs_load(curves, d / "goodput_vs_load.png"))
    return 0


def _profile_dict(prof: Profile) -> dict:
    src = prof.derived_from
    return {
        "model": prof.model,
        "gpu": prof.gpu.name,
        "tensor_parallel_size": prof.tensor_parallel_size,
        "derived_from": src.profile if src else None,
    }


def _profile_line(prof: Profile) -> str:
    src = prof.derived_from
    how = f"DERIVED from {src.profile} ({src.method}), not measured" if src else "measured"
    return f"{prof.model} on {prof.gpu.name} x TP{prof.tensor_parallel_size}, {how}"


def _profile(args: argparse.Namespace) -> int:
    from splitserve.simulator.profile_run import GPUFlags, check_measurable_tp, run_profile

    for flag in ("--cost-per-hour", "--idle-power-w"):
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < 0:
            raise SimInputError(f"{flag}: must be >= 0, got {value}")
    if args.power_w is not None:
        _positive(args, "--power-w")
    if args.nccl is not None and not (args.nccl[0] >= 0 and args.nccl[1] > 0):
        raise SimInputError(f"--nccl: latency must be >= 0 and bandwidth > 0, got {args.nccl[0]:g} {args.nccl[1]:g}")
    check_measurable_tp(args.tp)
    flags = GPUFlags(args.gpu_name, args.cost_per_hour, args.power_w, args.idle_power_w)
    result = run_profile(
        args.config,
        args.out,
        flags,
        quick=args.quick,
        nccl=tuple(args.nccl) if args.nccl else None,
        command=_profile_command(args),
        tensor_parallel_size=args.tp,
    )
    p, d = result.profile, result.profile.decode
    print(
        f"wrote {result.path} in {result.seconds:.1f} s: {p.model} on {p.gpu.name}; prefill {p.prefill.tokens[-1]} "
        f"tokens {p.prefill.seconds[-1] * 1e3:.1f} ms; decode step {d.base_s * 1e3:.2f} ms + "
        f"{d.per_seq_s * 1e6:.1f} us/seq + {d.per_context_token_s * 1e9:.2f} ns/context token; KV "
        f"{p.kv_bytes_per_token} B/token, {p.kv_capacity_tokens} tokens; kv_transfer: {', '.join(p.kv_transfer)}"
    )
    return 0


def _profile_command(args: argparse.Namespace) -> str:
    """The command line, for the profile's header (rebuilt from the flags: ``main`` may not be given sys.argv)."""
    words = ["splitserve", "profile", args.config, "--out", args.out]
    for flag in ("--gpu-name", "--cost-per-hour", "--power-w", "--idle-power-w"):
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            words += [flag, str(value)]
    if args.nccl:
        words += ["--nccl", *(f"{v:g}" for v in args.nccl)]
    if args.quick:
        words.append("--quick")
    if args.tp != 1:
        words += ["--tp", str(args.tp)]
    return shlex.join(words)


def _positive_list(text: str, flag: str, kind: type[float] | type[int], example: str) -> list:
    """A comma-separated list of positive numbers of ``kind``."""
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        raise SimInputError(f"{flag}: cannot read {text!r} (fix: comma-separated numbers, e.g. {example})") from None
    if any(v <= 0 for v in values):
        raise SimInputError(f"{flag}: every value must be > 0, got {text!r}")
    return values


def _rates(text: str | None) -> list[float]:
    return _positive_list(text, "--sweep-rates", float, "5,10,20") if text else []


def _chunks(text: str) -> list[int]:
    return _positive_list(text, "--chunk-sizes", int, "512,8192")


def cluster_dict(c: ClusterSpec) -> dict:
    return {
        "mode": c.mode,
        "policy": c.policy,
        "kv_backend": c.kv_backend,
        "gpus": c.gpus,
        "shared_gpus": c.shared_gpus,
        "incremental_transfer": c.incremental_transfer,
        "decode_prefix_weight": c.decode_prefix_weight,
        "local_prefill_max_tokens": c.local_prefill_max_tokens,
        "cost_per_hour": c.cost_per_hour,
        "pools": {
            name: {
                **{k: v for k, v in asdict(p).items() if k != "profile"},
                "gpu": p.profile.gpu.name,
                "tensor_parallel_size": p.tp,
                "gpus": p.gpus,
                "derived_profile": p.profile.derived,
            }
            for name, p in c.pools.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve", description="splitserve capacity-planning simulator")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
