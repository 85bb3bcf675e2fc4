"""A conversation workload's run, per turn index: TTFT, prefill tokens computed vs prompt tokens, prefix hit rate,
KV moved per request (the figures ``benchmarks/multiturn.py`` measures on a live cluster)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from splitserve.simulator.engine import RunResult
from splitserve.simulator.metrics import Percentiles


@dataclass(frozen=True)
class TurnMetrics:
    turn: int
    requests: int
    ttft_s: Percentiles
    prompt_tokens: float  # means per request
    new_tokens: float  # the prompt past the previous turn's prompt and answer
    computed_tokens: float  # prefill tokens computed
    moved_kv_bytes: float  # 0 colocated
    hit_rate: float  # prompt tokens found in a prefix cache / prompt tokens
    oracle_hit_rate: float  # the same with each turn's whole previous context cached (less its last token)

    def to_dict(self) -> dict:
        return asdict(self)


def per_turn(result: RunResult) -> list[TurnMetrics]:
    """Needs a run of a conversation workload (``Workload.conversations``)."""
    wl, stats, conv = result.workload, result.prefix, result.workload.conversations
    if stats is None or conv is None:
        raise ValueError("result: per-turn figures need a run of a conversation workload (fix: --multiturn)")
    ttft = result.first_token_s - wl.arrival_s
    bytes_per_token = result.cluster.prefill.profile.kv_bytes_per_token
    rows = []
    for k in np.unique(conv.turn).tolist():
        at = conv.turn == k
        prompt = wl.prompt_tokens[at]
        cached = stats.cached_tokens[at]
        rows.append(
            TurnMetrics(
                turn=k,
                requests=int(at.sum()),
                ttft_s=Percentiles.of(ttft[at]),
                prompt_tokens=float(prompt.mean()),
                new_tokens=float((prompt - conv.prefix_tokens[at]).mean()),
                computed_tokens=float((prompt - cached).mean()),
                moved_kv_bytes=float(stats.moved_tokens[at].mean() * bytes_per_token),
                hit_rate=float(cached.sum() / prompt.sum()),
                oracle_hit_rate=float(np.maximum(conv.prefix_tokens[at] - 1, 0).sum() / prompt.sum()),
            )
        )
    return rows


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns as wide as their widest cell, a rule under the header."""
    widths = [max(len(c) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [" ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in (headers, *rows)]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def format_turns(rows: Sequence[TurnMetrics]) -> str:
    headers = [
        "turn",
        "requests",
        "TTFT p50 ms",
        "p90",
        "prompt",
        "new",
        "computed",
        "hit rate",
        "oracle",
        "KV MB moved",
    ]
    cells = [
        [
            str(r.turn),
            str(r.requests),
            f"{r.ttft_s.p50 * 1e3:.1f}",
            f"{r.ttft_s.p90 * 1e3:.1f}",
            f"{r.prompt_tokens:.0f}",
            f"{r.new_tokens:.0f}",
            f"{r.computed_tokens:.0f}",
            f"{r.hit_rate:.1%}",
            f"{r.oracle_hit_rate:.1%}",
            f"{r.moved_kv_bytes / 1e6:.2f}",
        ]
        for r in rows
    ]
    return text_table(headers, cells)
