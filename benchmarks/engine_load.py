"""The colocated engine alone under open-loop load: no Ray, no gRPC, one process driving ``Engine.step``.

The floor a served cluster is compared with (docs/benchmarks.md, serving): requests arrive by a Poisson process, join
the continuous batch at the next step, and TTFT / TPOT are taken from the step that produced each token. Steps are
reported by kind: "mixed" when prompt tokens were waiting before it (a prefill chunk shares the step), "decode"
otherwise.

    python benchmarks/engine_load.py --model-shape llama3-8b --rates 16,32      # on the GPU
    python benchmarks/engine_load.py --model-shape small --rates 4 --num-requests 16 --prompt-len 64 --output-len 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from splitserve.bench.make_random_checkpoint import SHAPES, llama_config
from splitserve.bench.metrics import percentiles
from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams


def run_rate(engine: Engine, rate: float, n: int, args: argparse.Namespace, tag: str) -> dict:
    rng = np.random.default_rng([args.seed, int(rate * 1000)])
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    prompts = rng.integers(0, 1000, (n, args.prompt_len)).tolist()
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    count: dict[int, int] = {}
    steps: list[tuple[bool, float]] = []  # (had prompt tokens waiting, seconds)
    start, sent = time.perf_counter(), 0
    while sent < n or engine.has_work():
        now = time.perf_counter() - start
        while sent < n and arrivals[sent] <= now:
            engine.add_request(f"{tag}-{sent}", prompts[sent], params)
            sent += 1
        if not engine.has_work():
            time.sleep(min(0.001, max(0.0, arrivals[sent] - now)))
            continue
        mixed = engine.pending_prefill_tokens() > 0
        t0 = time.perf_counter()
        outputs = engine.step()
        t1 = time.perf_counter()
        steps.append((mixed, t1 - t0))
        for out in outputs:
            i = int(out.request_id.rsplit("-", 1)[1])
            first.setdefault(i, t1 - start)
            last[i], count[i] = t1 - start, count.get(i, 0) + 1
    ttft = [(first[i] - arrivals[i]) * 1e3 for i in first]
    tpot = [(last[i] - first[i]) / (count[i] - 1) * 1e3 for i in first if count[i] > 1]
    mixed_s = [s for m, s in steps if m]
    decode_s = [s for m, s in steps if not m]
    return {
        "rate": rate,
        "ttft_ms": percentiles(ttft, (50, 90)),
        "tpot_ms": percentiles(tpot, (50, 90)),
        "mixed_steps": len(mixed_s),
        "mixed_step_ms_mean": statistics.fmean(mixed_s) * 1e3 if mixed_s else None,
        "decode_steps": len(decode_s),
        "decode_step_ms_mean": statistics.fmean(decode_s) * 1e3 if decode_s else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--device", default="auto")
    p.add_argument("--rates", default="16,32", help="offered loads in requests/s, comma-separated")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="the chunked-prefill budget per step")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--no-overlap", action="store_true", help="read each decode step back before the next launch")
    p.add_argument("--warmup", type=int, default=48, help="requests at 16 req/s before the timed rates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/engine_load.json")
    args = p.parse_args()
    runner = RunnerConfig(model_dir=None, device=args.device, max_batch_tokens=args.max_batch_tokens)
    config = EngineConfig(
        runner,
        max_batch_size=args.max_batch_size,
        enable_prefix_caching=False,
        overlap_decode=False if args.no_overlap else None,
    )
    engine = Engine(config, hf_config=llama_config(args.model_shape))
    if args.warmup:
        run_rate(engine, 16.0, args.warmup, args, "warmup")
    rows = []
    heads = ("TTFT p50/p90 ms", "TPOT p50/p90 ms", "mixed steps (ms)", "decode steps (ms)")
    print(f"{'rate':>6} {heads[0]:>16} {heads[1]:>16} {heads[2]:>18} {heads[3]:>18}")
    for i, rate in enumerate(float(r) for r in args.rates.split(",")):
        row = run_rate(engine, rate, args.num_requests, args, f"r{i}")
        rows.append(row)
        mixed = f"{row['mixed_steps']} ({row['mixed_step_ms_mean'] or 0:.1f})"
        decode = f"{row['decode_steps']} ({row['decode_step_ms_mean'] or 0:.2f})"
        ttft = "/".join(f"{v:.1f}" for v in row["ttft_ms"].values())
        tpot = "/".join(f"{v:.2f}" for v in row["tpot_ms"].values())
        print(f"{rate:6g} {ttft:>16} {tpot:>16} {mixed:>18} {decode:>18}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**vars(args), "device": str(engine.runner.device), "date": time.strftime("%Y-%m-%d")}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
