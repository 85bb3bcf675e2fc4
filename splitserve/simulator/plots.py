"""PNG plots for a plan: latency CDFs and goodput vs load (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from splitserve.simulator.engine import RunResult
from splitserve.simulator.metrics import tpot
from splitserve.simulator.planner import LoadPoint


def latency_cdfs(runs: Mapping[str, RunResult], path: Path) -> Path:
    """TTFT, TPOT and E2E CDFs, one line per labelled run."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, r in runs.items():
        series = {
            "TTFT (ms)": r.first_token_s - r.workload.arrival_s,
            "TPOT (ms)": tpot(r),
            "E2E (ms)": r.finish_s - r.workload.arrival_s,
        }
        for ax, (name, x) in zip(axes, series.items(), strict=True):
            x = np.sort(x[~np.isnan(x)]) * 1e3
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=label)
            ax.set_xlabel(name)
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def goodput_vs_load(curves: Mapping[str, Sequence[LoadPoint]], path: Path) -> Path:
    """Goodput per GPU against offered load, one line per labelled cluster."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        ax.plot([p.rate for p in points], [p.metrics.goodput_rps / p.metrics.gpus for p in points], "o-", label=label)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("goodput per GPU (requests/s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
