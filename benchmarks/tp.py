"""Tensor-parallel engine speed per TP degree: decode step time by batch, TTFT of a long prompt, and what the rank
group costs the leader per step (its host time handing the step to the followers) and in collectives.

    python benchmarks/tp.py --tp 1,2,4 --device cpu              # the tiny model, gloo ranks on this host
    python benchmarks/tp.py --model DIR --tp 1 --device cuda     # one GPU; --tp 2,4,8 on a multi-GPU host

Collective time is the leader's wall time inside its all-reduces and all-gathers of eager passes; on CUDA the decode
and prompt graphs replay them out of Python's sight, so that column reads '-' there.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams
from splitserve.engine.rank_loop import offline_engine
from splitserve.engine.resolve import resolve_model_path
from splitserve.engine.tensor_parallel import RankGroup


class CollectiveClock:
    """Wall time of the leader's collectives (eager passes; on CUDA after a sync, so only meaningful on CPU)."""

    def __init__(self, group: RankGroup | None):
        self.seconds = 0.0
        if group is None:
            return
        for name in ("all_reduce", "all_gather_columns"):
            setattr(group, name, self._timed(getattr(group, name)))

    def _timed(self, collective: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            began = time.perf_counter()
            out = collective(x)
            self.seconds += time.perf_counter() - began
            return out

        return run


def _sent(engine: Engine) -> float:
    channel = engine.runner.step_channel
    return 0.0 if channel is None else channel.send_seconds


def decode_row(engine: Engine, clock: CollectiveClock, batch: int, steps: int) -> dict[str, float]:
    """Per decode step of ``batch`` sequences: wall ms, the leader's host ms (all but its waits for the device; the
    hand-off included), the leader's hand-off ms, collective ms. Timed on a second run of the same lengths: on the
    CPU each new context length costs its first step a set-up."""
    _decode_steps(engine, clock, batch, steps, "warm")
    return _decode_steps(engine, clock, batch, steps, "timed")


def _decode_steps(engine: Engine, clock: CollectiveClock, batch: int, steps: int, tag: str) -> dict[str, float]:
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}{batch}-{i}", [(7 * i + j) % 200 + 1 for j in range(16)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.running) or engine.waiting:
        engine.step()
    began, sent, coll, host = time.perf_counter(), _sent(engine), clock.seconds, engine.step_times.host_s
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - began) / steps
    while engine.has_work():
        engine.step()
    return {
        "step_ms": 1e3 * wall,
        "host_ms": 1e3 * (engine.step_times.host_s - host) / steps,
        "handoff_ms": 1e3 * (_sent(engine) - sent) / steps,
        "collective_ms": 1e3 * (clock.seconds - coll) / steps,
    }


def ttft_ms(engine: Engine, length: int) -> float:
    """Milliseconds from adding one prompt to its first token, on an idle engine (the second of two runs; the two
    prompts differ from their first token, so the second finds nothing in the prefix cache)."""
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    took = 0.0
    for run in range(2):
        began = time.perf_counter()
        engine.add_request(f"p{length}-{run}", [(5 * j + run) % 200 + 1 for j in range(length)], params)
        while engine.has_work():
            engine.step()
        took = time.perf_counter() - began
    return 1e3 * took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="HF checkpoint directory, or 'tiny'")
    parser.add_argument("--tp", default="1,2", help="comma-separated TP degrees")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--prompts", default="1024", help="prompt lengths for TTFT (e.g. 1024,4096 on a GPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.prompts.split(",")]
    rows: list[dict[str, Any]] = []
    for tp in (int(t) for t in args.tp.split(",")):
        runner = RunnerConfig(str(resolve_model_path(args.model)), device=args.device, num_kv_blocks=None)
        config = EngineConfig(runner, max_batch_size=max(batches), load_tokenizer=False)
        with offline_engine(config, tp) as engine:
            clock = CollectiveClock(engine.runner.rank_group)
            graphs = engine.runner.graphs is not None
            for batch in batches:
                row = decode_row(engine, clock, batch, args.steps)
                if graphs:
                    row["collective_ms"] = float("nan")
                rows.append({"tp": tp, "batch": batch, **row})
            for length in lengths:
                rows.append({"tp": tp, "prompt": length, "ttft_ms": ttft_ms(engine, length)})
    print(
        f"{'tp':>3} {'batch':>6} {'step ms':>9} {'host ms':>8} {'hand-off ms':>12} {'(% of step)':>12} "
        f"{'collectives ms':>15}"
    )
    for row in rows:
        if "batch" in row:
            share = 100 * row["handoff_ms"] / row["step_ms"]
            coll = "-" if row["collective_ms"] != row["collective_ms"] else f"{row['collective_ms']:.2f}"
            print(
                f"{row['tp']:>3} {row['batch']:>6} {row['step_ms']:>9.2f} {row['host_ms']:>8.2f} "
                f"{row['handoff_ms']:>12.3f} {share:>11.1f}% {coll:>15}"
            )
    for row in rows:
        if "prompt" in row:
            print(f"tp {row['tp']}: TTFT of a {row['prompt']}-token prompt {row['ttft_ms']:.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
