"""What a benchmark run leaves behind: one comparison table, a JSON file with every record, a PNG of latency CDFs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.bench.metrics import RequestRecord, Summary
from splitserve.bench.sweep import SweepResult

Baseline = tuple[Summary, list[RequestRecord]]  # the HF run: its summary and records

_COLUMNS = (
    ("system", "<"),
    ("rate", ">"),
    ("ok/sent", ">"),
    ("req/s", ">"),
    ("tok/s", ">"),
    ("goodput", ">"),
    ("SLO %", ">"),
    ("TTFT p50/p90/p99 ms", ">"),
    ("TPOT p50/p90/p99 ms", ">"),
    ("1st→2nd p50/p90/p99 ms", ">"),
    ("KV % TTFT", ">"),
    ("KV exposed % TTFT", ">"),
)


def _ms(p: dict[str, float | None]) -> str:
    return "/".join("-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in p.values())


def _row(s: Summary) -> list[str]:
    return [
        s.label,
        "static" if s.rate is None else f"{s.rate:g}",
        f"{s.ok}/{s.sent}",
        f"{s.throughput_req_s:.2f}",
        f"{s.throughput_tok_s:.0f}",
        f"{s.goodput_req_s:.2f}",
        f"{100 * s.slo_attainment:.0f}",
        _ms(s.ttft_ms),
        _ms(s.tpot_ms),
        _ms(s.second_token_ms),
        *("-" if share is None else f"{100 * share:.1f}" for share in (s.kv_share_of_ttft, s.kv_exposed_share_of_ttft)),
    ]


def format_table(sweeps: Sequence[SweepResult], baseline: Summary | None = None) -> str:
    """Every (system, rate) run as a row, then each system's max goodput (the best rate meeting the SLOs)."""
    rows = [_row(r.summary) for sweep in sweeps for r in sweep.runs]
    if baseline is not None:
        rows.append(_row(baseline))
    header = [name for name, _ in _COLUMNS]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{align}{w}}" for c, (_, align), w in zip(cells, _COLUMNS, widths, strict=True))

    out = [line(header), line(["-" * w for w in widths]), *map(line, rows), ""]
    for sweep in sweeps:
        best = sweep.best
        if best is None:
            found = "no rate met the SLOs"
        else:
            found = f"{best.goodput_req_s:.2f} req/s at rate {best.rate:g}"
            if best.rate == max(r.summary.rate or 0.0 for r in sweep.runs):
                found += " (the highest rate tried: the limit is above it)"
        out.append(f"max goodput {sweep.label}: {found}")
    return "\n".join(out)


def write_json(path: Path, meta: dict[str, Any], sweeps: Sequence[SweepResult], baseline: Baseline | None) -> None:
    payload = {
        **meta,
        "systems": [s.to_json() for s in sweeps],
        "hf_baseline": None
        if baseline is None
        else {"summary": baseline[0].to_json(), "records": [asdict(r) for r in baseline[1]]},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


_COLORMAPS = ("Blues", "Oranges", "Greens", "Purples")


def _cdf(ax: Any, values: list[float], **style: Any) -> None:
    if values:
        xs = np.sort(values)
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", **style)


def plot(path: Path, sweeps: Sequence[SweepResult], baseline: Baseline | None) -> None:
    """TTFT, TPOT and E2E CDFs of every run (one colour per system, darker = higher rate), plus SLO attainment
    against offered rate per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    runs: list[tuple[list[RequestRecord], dict[str, Any]]] = []
    for k, sweep in enumerate(sweeps):
        cmap = plt.get_cmap(_COLORMAPS[k % len(_COLORMAPS)])
        for j, r in enumerate(sweep.runs):
            shade = 0.45 + 0.55 * j / max(1, len(sweep.runs) - 1)
            runs.append((r.records, {"color": cmap(shade), "label": f"{sweep.label} @ {r.summary.rate:g}/s"}))
    if baseline is not None:
        runs.append((baseline[1], {"color": "black", "linestyle": "--", "label": baseline[0].label}))
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, attr, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "E2E"), strict=False):
        for records, style in runs:
            _cdf(ax, [v for r in records if (v := getattr(r, attr)) is not None], **style)
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests", xscale="log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
    for k, sweep in enumerate(sweeps):
        color = plt.get_cmap(_COLORMAPS[k % len(_COLORMAPS)])(0.8)
        rates = [r.summary.rate for r in sweep.runs]
        attained = [100 * r.summary.slo_attainment for r in sweep.runs]
        axes[3].plot(rates, attained, marker="o", color=color, label=sweep.label)
    axes[3].axhline(90, color="gray", linestyle="--", linewidth=1)
    axes[3].set(ylim=(0, 105), title="SLO attainment", xlabel="offered rate (req/s)", ylabel="% meeting both SLOs")
    axes[3].grid(True, alpha=0.3)
    for ax in axes:
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
