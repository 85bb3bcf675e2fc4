"""Abort-storm benchmark: how fast a cancel frees pages everywhere, whether any page is stranded, and goodput
(completed requests/s) before, during and after a storm of client cancels.

    python benchmarks/chaos.py                       # tiny model on CPU, local Ray, 1 prefill + 1 decode
    python benchmarks/chaos.py --config configs/x.yaml --requests 2000 --out chaos.json   # a GPU config

Phases: ``warmup`` (a steady batch, not compared: the first one pays for cold caches), ``before`` (a steady batch,
nothing cancelled), ``storm`` (``--requests`` at once, ``--cancel-frac`` of them cancelled at random moments within
``--cancel-window-s``), ``after`` (a steady batch of the same prompt lengths as ``before`` but new tokens, so it starts
from the same prefix-cache state: no hits), and ``after_cached`` (``before``'s prompts again: every full block is a
prefix-cache hit, so the prompts are barely computed and their KV transfers all start at once; a different load,
reported apart, never compared with ``before``).
Abort to pages freed: for each cancelled request, the time from its cancel until the last worker that held its
pages gave them back, from the times the workers log when they free a request's pages (``release_times``; a
worker that had freed them before the cancel counts as zero); per role, split at the abort's arrival there
(``abort_times``) into the router's part and the worker's own. Abort acknowledged: until the router's abort calls
returned. "Every page free" is the time from the last cancel until every worker's free page count is back at its
total. Stranded pages: pages still in use once the cluster is idle (must be 0). Unhandled errors: Ray's "Unhandled
error" (a failed call's result nobody read) and asyncio's "never retrieved" logged in this process, the router's
(must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import ray
import torch

from splitserve.cluster.controller import Cluster
from splitserve.cluster.messages import GenerateRequest, RequestTiming, ServingError
from splitserve.config import load_config, parse_config
from splitserve.engine import SamplingParams
from splitserve.engine.testing import make_tiny_model


class UnhandledErrors(logging.Handler):
    """Counts the errors that nobody handled, by who logged them: a result or failure left unread is a leak."""

    LOGGERS = {"ray._private.worker": "Unhandled error", "asyncio": "exception was never retrieved"}

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.counts: Counter[str] = Counter()
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.LOGGERS.get(record.name, "\0") in message:
            self.counts[record.name] += 1
            if len(self.samples) < 5:
                self.samples.append(message[:300])

    def __enter__(self) -> UnhandledErrors:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


def _tiny_config(model_dir: str):
    return parse_config(
        {
            "model": {"path": model_dir, "dtype": "float32"},
            "cluster": {"device": "cpu"},
            "kv_cache": {"block_size": 8},
            "prefill": {"replicas": 1, "gpus_per_replica": 0, "num_kv_blocks": 1024, "max_batch_tokens": 512},
            "decode": {"replicas": 1, "gpus_per_replica": 0, "num_kv_blocks": 2048, "max_batch_size": 64},
            "kv_transfer": {"backend": "grpc", "timeout_s": 30},
        }
    )


def _prompts(n: int, lo: int, hi: int, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


def _same_lengths(prompts: list[list[int]], seed: int, vocab: int) -> list[list[int]]:
    """Prompts of the same lengths with new random tokens: the same work, and no prefix shared with ``prompts``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (len(p),), generator=g).tolist() for p in prompts]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def _one(cluster: Cluster, rid: str, prompt: list[int], max_tokens: int, latency: list | None = None) -> str:
    request = GenerateRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    timing = RequestTiming(arrival=time.monotonic())
    n = 0
    try:
        async for batch in cluster.generate(request, timing):
            n += len(batch.tokens)
    except ServingError as err:
        return f"error:{err.code}"
    if latency is not None and timing.first_token is not None:
        latency.append((timing.first_token - timing.arrival, time.monotonic() - timing.arrival))
    return "completed" if n == max_tokens else "short"


async def _prefix_hits(cluster: Cluster) -> int:
    return sum(s.prefix_cache_hit_blocks for s in await cluster.refresh_stats())


async def _steady(cluster: Cluster, tag: str, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    hits = await _prefix_hits(cluster)
    latency: list[tuple[float, float]] = []
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(_one(cluster, f"{tag}-{i}", p, max_tokens, latency) for i, p in enumerate(prompts))
    )
    wall = time.monotonic() - t0
    done = sum(r == "completed" for r in results)
    ttft, e2e = [t for t, _ in latency], [e for _, e in latency]
    return {
        "requests": len(prompts),
        "completed": done,
        "outcomes": dict(Counter(results)),
        "seconds": wall,
        "goodput_rps": done / wall,
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_max_s": max(ttft, default=None),
        "e2e_p50_s": _pct(e2e, 0.5),
        "e2e_max_s": max(e2e, default=None),  # the batch's wall is its slowest request: look here for a straggler
        "prefix_hit_blocks": await _prefix_hits(cluster) - hits,
    }


async def _used_pages(cluster: Cluster) -> int:
    return sum(s.kv_blocks_total - s.kv_blocks_free for s in await cluster.refresh_stats())


async def _freed_after(cluster: Cluster, aborted_at: dict[str, float]) -> dict[str, dict[str, list[float]]]:
    """Seconds from each cancel until the request's pages were freed: on every worker that held them ("all"), and
    per role (requests whose pages that role held), split per role into the abort's way to the worker ("reached":
    the router's part) and the worker's own part ("on_worker": from the abort's arrival, 0 where it had freed them
    before)."""
    workers = list(cluster.workers.values())
    releases = await asyncio.gather(*(w.actor.release_times.remote() for w in workers))
    arrivals = await asyncio.gather(*(w.actor.abort_times.remote() for w in workers))
    delays: dict[str, dict[str, list[float]]] = {"all": {"freed": []}}
    for request_id, cancelled in aborted_at.items():
        latest = 0.0
        for worker, released, arrived in zip(workers, releases, arrivals, strict=True):
            if request_id not in released:
                continue
            delay = max(0.0, released[request_id] - cancelled)
            role = delays.setdefault(worker.role, {"freed": [], "reached": [], "on_worker": []})
            role["freed"].append(delay)
            if request_id in arrived:
                role["reached"].append(max(0.0, arrived[request_id] - cancelled))
                role["on_worker"].append(max(0.0, released[request_id] - arrived[request_id]))
            latest = max(latest, delay)
        delays["all"]["freed"].append(latest)
    return delays


async def scenario(cluster: Cluster, args) -> dict[str, Any]:
    rng = random.Random(args.seed)
    vocab = min(w.info["vocab_size"] for w in cluster.workers.values())
    steady = _prompts(args.steady, args.min_prompt, args.max_prompt, args.seed + 1, vocab)
    # Every compared batch has the same prompt lengths and tokens no earlier batch had: before and after then start
    # from the same prefix-cache state (no hits), and neither pays the first batch's cold start.
    report: dict[str, Any] = {
        "warmup": await _steady(cluster, "warmup", _same_lengths(steady, args.seed + 3, vocab), args.max_tokens)
    }
    report["before"] = await _steady(cluster, "before", steady, args.max_tokens)

    storm = _prompts(args.requests, args.min_prompt, args.max_prompt, args.seed + 2, vocab)
    aborted_at: dict[str, float] = {}  # wall clock, as the workers' release times
    acked_after: list[float] = []

    async def storm_one(i: int, prompt: list[int]) -> str:
        rid = f"storm-{i}"
        try:
            return await _one(cluster, rid, prompt, rng.randint(args.max_tokens // 2, args.max_tokens))
        except asyncio.CancelledError:
            return "cancelled"

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(storm_one(i, p)) for i, p in enumerate(storm)]
    doomed = rng.sample(range(len(tasks)), int(args.cancel_frac * len(tasks)))

    async def cancel_later(i: int) -> None:
        await asyncio.sleep(rng.uniform(0, args.cancel_window_s))
        if not tasks[i].done():
            aborted_at[f"storm-{i}"] = time.time()
            tasks[i].cancel()
            try:
                await tasks[i]  # returns once the request's aborts have been sent to (and answered by) its workers
            except asyncio.CancelledError:
                pass
            acked_after.append(time.time() - aborted_at[f"storm-{i}"])

    await asyncio.gather(*(cancel_later(i) for i in doomed))
    last_cancel = max(aborted_at.values(), default=time.time())
    results = await asyncio.gather(*tasks, return_exceptions=True)
    storm_wall = time.monotonic() - t0
    # Everything else finished: the cluster is idle, so every page must come back.
    deadline = time.monotonic() + args.settle_s
    used = await _used_pages(cluster)
    while used and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        used = await _used_pages(cluster)
    freed_after = await _freed_after(cluster, aborted_at)
    completed = sum(r == "completed" for r in results)
    report["storm"] = {
        "requests": len(storm),
        "cancelled": len(aborted_at),
        "completed": completed,
        "errors": sum(isinstance(r, str) and r.startswith("error") for r in results),
        "error_codes": dict(Counter(r for r in results if isinstance(r, str) and r.startswith("error"))),
        "seconds": storm_wall,
        "goodput_rps": completed / storm_wall,
        "abort_to_freed_p50_s": _pct(freed_after["all"]["freed"], 0.5),
        "abort_to_freed_p99_s": _pct(freed_after["all"]["freed"], 0.99),
        "abort_to_freed_max_s": max(freed_after["all"]["freed"], default=None),
        "abort_to_freed_by_role": {
            role: {
                "requests": len(xs["freed"]),
                "p50_s": _pct(xs["freed"], 0.5),
                "p99_s": _pct(xs["freed"], 0.99),
                "reached_p50_s": _pct(xs["reached"], 0.5),
                "reached_p99_s": _pct(xs["reached"], 0.99),
                "on_worker_p50_s": _pct(xs["on_worker"], 0.5),
                "on_worker_p99_s": _pct(xs["on_worker"], 0.99),
            }
            for role, xs in freed_after.items()
            if role != "all"
        },
        "abort_acked_p50_s": _pct(acked_after, 0.5),
        "abort_acked_p99_s": _pct(acked_after, 0.99),
        "last_cancel_to_idle_s": time.time() - last_cancel if not used else None,
        "stranded_pages": used,
        "inflight_left": len(cluster._inflight),
    }
    report["after"] = await _steady(cluster, "after", _same_lengths(steady, args.seed + 4, vocab), args.max_tokens)
    # The old "after": before's prompts again, all prefix-cache hits. Reported apart, never compared with before.
    report["after_cached"] = await _steady(cluster, "after_cached", steady, args.max_tokens)
    return report


def _table(report: dict[str, Any]) -> str:
    rows = [("phase", "requests", "completed", "seconds", "goodput req/s", "e2e p50/max s", "prefix hits")]
    for phase in ("warmup", "before", "storm", "after", "after_cached"):
        r = report[phase]
        e2e = f"{r['e2e_p50_s']:.2f}/{r['e2e_max_s']:.2f}" if r.get("e2e_max_s") is not None else "-"
        rows.append(
            (
                phase,
                str(r["requests"]),
                str(r["completed"]),
                f"{r['seconds']:.2f}",
                f"{r['goodput_rps']:.1f}",
                e2e,
                str(r.get("prefix_hit_blocks", "-")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    s = report["storm"]

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{1000 * x:.1f} ms"

    lines += [
        "",
        f"cancelled: {s['cancelled']} of {s['requests']}; errors: {s['errors']} {s['error_codes']}",
        f"abort -> pages freed: p50 {ms(s['abort_to_freed_p50_s'])}, p99 {ms(s['abort_to_freed_p99_s'])}, "
        f"max {ms(s['abort_to_freed_max_s'])}",
        *(
            f"  on {role} workers ({r['requests']} requests held pages there): p50 {ms(r['p50_s'])}, "
            f"p99 {ms(r['p99_s'])}; the abort's way there p50 {ms(r['reached_p50_s'])}, p99 {ms(r['reached_p99_s'])}; "
            f"from its arrival p50 {ms(r['on_worker_p50_s'])}, p99 {ms(r['on_worker_p99_s'])}"
            for role, r in s["abort_to_freed_by_role"].items()
        ),
        f"abort -> acknowledged to the router: p50 {ms(s['abort_acked_p50_s'])}, p99 {ms(s['abort_acked_p99_s'])}",
        f"last cancel -> every page free: {ms(s['last_cancel_to_idle_s'])}",
        f"stranded pages: {s['stranded_pages']} (must be 0); requests left in flight: {s['inflight_left']}",
        f"unhandled errors: {report['unhandled_errors']['count']} (must be 0) {report['unhandled_error_samples']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a splitserve config (GPU); default: the tiny model on CPU")
    p.add_argument("--requests", type=int, default=200, help="requests in the storm")
    p.add_argument("--cancel-frac", type=float, default=0.7)
    p.add_argument("--cancel-window-s", type=float, default=2.0)
    p.add_argument("--steady", type=int, default=32, help="requests in each steady batch (warmup, before, after)")
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--settle-s", type=float, default=10.0, help="how long pages may take to come back")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)

    if args.config:
        config = load_config(args.config)
    else:
        config = _tiny_config(str(make_tiny_model(tempfile.mkdtemp(prefix="chaos-tiny-"))))
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"SPLITSERVE_CPU_THREADS": "1", "SPLITSERVE_LOG_LEVEL": "WARNING"}},
        )

    async def run() -> dict[str, Any]:
        cluster = Cluster(config)
        await cluster.start()
        try:
            return await scenario(cluster, args)
        finally:
            await cluster.shutdown()

    with UnhandledErrors() as unhandled:
        report = asyncio.run(run())
    report["unhandled_errors"] = {"count": sum(unhandled.counts.values()), **unhandled.counts}
    report["unhandled_error_samples"] = unhandled.samples
    report["args"] = vars(args)
    print(_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    storm = report["storm"]
    ok = storm["stranded_pages"] == 0 and storm["inflight_left"] == 0 and report["unhandled_errors"]["count"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
