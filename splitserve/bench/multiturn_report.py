"""What a multi-turn run reports per turn index: TTFT, KV moved, prefill tokens computed vs new tokens, prefix hit
rate next to an oracle's, worker affinity.

Pure functions over turn records, whose cache and KV figures come from the server's per-request timing
(``cached_prompt_tokens``, ``kv_transfer_bytes``). ``same_prefill_worker`` / ``same_decode_worker`` say how often a
turn went back to the worker that served the conversation's previous turn. The oracle hit rate is what a placement
that always finds a turn's whole previous context cached would hit: that context less its last token (whose KV is never
computed), at token granularity, so it bounds every placement from above (the runtime caches whole blocks).
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
    computed_tokens: float | None  # prompt tokens the prefill computed (prompt - cached), mean
    hit_rate: float | None  # cached / prompt tokens, over the turn's requests
    oracle_hit_rate: float | None  # the same with the whole previous context cached (module docstring)
    kv_bytes: float | None  # KV bytes moved per request, mean
    kv_bytes_per_new_token: float | None  # KV bytes moved / the turn's new tokens, over the turn's requests
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


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _ratio(num: Sequence[float], den: Sequence[float]) -> float | None:
    return float(sum(num) / sum(den)) if num and sum(den) else None


def summarize_turns(records: Sequence[TurnRecord]) -> list[TurnSummary]:
    by_key = {(r.conversation, r.turn): r for r in records}
    summaries = []
    for k in sorted({r.turn for r in records}):
        turn = [r for r in records if r.turn == k]
        ok = [r for r in turn if r.status == OK]
        previous = [(r, by_key[(r.conversation, k - 1)]) for r in ok if k > 0]
        cached = [r for r in ok if r.cached_prompt_tokens is not None]
        prompts = [r.prompt_tokens for r in cached]
        moved = [r for r in ok if r.kv_transfer_bytes is not None]
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
                computed_tokens=_mean([r.prompt_tokens - (r.cached_prompt_tokens or 0) for r in cached]),
                hit_rate=_ratio([r.cached_prompt_tokens or 0 for r in cached], prompts),
                oracle_hit_rate=_ratio([max(r.reused_tokens - 1, 0) for r in cached], prompts),
                kv_bytes=_mean([r.kv_transfer_bytes or 0 for r in moved]),
                kv_bytes_per_new_token=_ratio([r.kv_transfer_bytes or 0 for r in moved], [r.new_tokens for r in moved]),
                same_prefill_worker=_share([r.prefill_worker == p.prefill_worker for r, p in previous]) if k else None,
                same_decode_worker=_share([r.decode_worker == p.decode_worker for r, p in previous]) if k else None,
            )
        )
    return summaries


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(runs: Sequence[PolicyRun]) -> str:
    headers = ["policy", "turn", "ok/sent", "TTFT p50 ms", "p90", "KV ms p50", "prompt", "new", "computed", "hit"]
    headers += ["oracle", "KV KB/req", "KV B/new tok", "same P", "same D"]
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
            _fmt(s.computed_tokens, ".0f"),
            _fmt(s.hit_rate, ".0%"),
            _fmt(s.oracle_hit_rate, ".0%"),
            _fmt(None if s.kv_bytes is None else s.kv_bytes / 1024, ".0f"),
            _fmt(s.kv_bytes_per_new_token, ".0f"),
            _fmt(s.same_prefill_worker, ".0%"),
            _fmt(s.same_decode_worker, ".0%"),
        ]
        for run in runs
        for s in run.per_turn()
    ]
    return text_table(headers, cells)


def report_dict(meta: dict[str, Any], runs: Sequence[PolicyRun]) -> dict[str, Any]:
    return {
        "meta": meta,
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
