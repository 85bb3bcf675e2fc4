"""What a multi-turn run reports per turn index: TTFT, KV transfer time, prompt vs new tokens, worker affinity.

Pure functions over turn records. Two figures the issue asks for are not in the SDK's per-request timing, so they
are not reported (never estimated): ``RUNTIME_MISSING`` names them and what the runtime must expose. Until then,
``same_prefill_worker`` / ``same_decode_worker`` say how often a turn went back to the worker that served the
conversation's previous turn, the only place its prefix can be cached.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.bench.metrics import percentiles
from splitserve.bench.multiturn_load import OK, TurnRecord
from splitserve.simulator.turns import text_table

RUNTIME_MISSING = {
    "prefill tokens computed, prefix hit rate": "Timing.cached_prompt_tokens: the prompt tokens the prefill (or "
    "colocated) worker found in its prefix cache, i.e. the engine's Sequence.num_cached_tokens at admission, carried "
    "in RequestTiming and the proto's Timing",
    "KV bytes moved per request": "Timing.kv_transfer_bytes: the bytes the request's KV transfer moved (0 colocated)",
}


@dataclass(frozen=True)
class TurnSummary:
    turn: int
    requests: int
    ok: int
    ttft_ms: dict[str, float | None]
    kv_transfer_ms: dict[str, float | None]
    prompt_tokens: float  # means over the turn's requests
    new_tokens: float
    reused_tokens: float
    same_prefill_worker: float | None  # share of ok turns on the previous turn's worker; None on the first turn
    same_decode_worker: float | None


@dataclass(frozen=True)
class PolicyRun:
    policy: str
    duration_s: float
    records: list[TurnRecord]

    def per_turn(self) -> list[TurnSummary]:
        return summarize_turns(self.records)


def _share(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def summarize_turns(records: Sequence[TurnRecord]) -> list[TurnSummary]:
    by_key = {(r.conversation, r.turn): r for r in records}
    summaries = []
    for k in sorted({r.turn for r in records}):
        turn = [r for r in records if r.turn == k]
        ok = [r for r in turn if r.status == OK]
        previous = [(r, by_key[(r.conversation, k - 1)]) for r in ok if k > 0]
        summaries.append(
            TurnSummary(
                turn=k,
                requests=len(turn),
                ok=len(ok),
                ttft_ms=percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None], (50, 90)),
                kv_transfer_ms=percentiles([r.kv_transfer_ms for r in ok if r.kv_transfer_ms is not None], (50, 90)),
                prompt_tokens=float(np.mean([r.prompt_tokens for r in turn])),
                new_tokens=float(np.mean([r.new_tokens for r in turn])),
                reused_tokens=float(np.mean([r.reused_tokens for r in turn])),
                same_prefill_worker=_share([r.prefill_worker == p.prefill_worker for r, p in previous]) if k else None,
                same_decode_worker=_share([r.decode_worker == p.decode_worker for r, p in previous]) if k else None,
            )
        )
    return summaries


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(runs: Sequence[PolicyRun]) -> str:
    headers = ["policy", "turn", "ok/sent", "TTFT p50 ms", "p90", "KV ms p50", "prompt", "new", "reused"]
    headers += ["same P", "same D"]
    cells = [
        [
            run.policy,
            str(s.turn),
            f"{s.ok}/{s.requests}",
            _fmt(s.ttft_ms["p50"], ".1f"),
            _fmt(s.ttft_ms["p90"], ".1f"),
            _fmt(s.kv_transfer_ms["p50"], ".1f"),
            f"{s.prompt_tokens:.0f}",
            f"{s.new_tokens:.0f}",
            f"{s.reused_tokens:.0f}",
            _fmt(s.same_prefill_worker, ".0%"),
            _fmt(s.same_decode_worker, ".0%"),
        ]
        for run in runs
        for s in run.per_turn()
    ]
    missing = "; ".join(f"{what} need {field}" for what, field in RUNTIME_MISSING.items())
    return f"{text_table(headers, cells)}\nnot reported (the runtime does not expose them yet): {missing}"


def report_dict(meta: dict[str, Any], runs: Sequence[PolicyRun]) -> dict[str, Any]:
    return {
        "meta": meta,
        "runtime_missing": RUNTIME_MISSING,
        "policies": [
            {
                "policy": run.policy,
                "duration_s": run.duration_s,
                "per_turn": [asdict(s) for s in run.per_turn()],
                "records": [{**asdict(r), "new_tokens": r.new_tokens} for r in run.records],
            }
            for run in runs
        ],
    }


def write_json(path: Path, meta: dict[str, Any], runs: Sequence[PolicyRun]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_dict(meta, runs), indent=2))
