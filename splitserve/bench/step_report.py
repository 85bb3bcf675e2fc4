"""Served engine steps beside the profile's price for their shape (``Profile.step_time``): whether the simulator
prices the steps a serving worker actually ran, by kind of step and size.

    SPLITSERVE_STEP_TRACE=/tmp/steps python benchmarks/sim_validate.py ...    # per rate, in its JSON and table
    python -m splitserve.bench.step_report /tmp/steps --profile configs/profiles/llama3-8b-h200.yaml \\
        [--windows results/sim_validate/sim_validate.json]

A step's measured time is its engine call's wall time (``engine/step_trace.py``). With overlapped decode steps a
call launches one step and reads back the one before, so a decode-only call mostly waits for its predecessor's
device work; a mixed step's eager launch is host-bound and lands in the call that launched it. Totals over a window
are exact either way: the sum of the calls is the time the engine thread spent stepping.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from splitserve.engine.step_trace import StepRecord, load
from splitserve.simulator.profile import Profile, load_profile

# Upper bounds of each size bucket: decode rows for decode steps, prompt tokens for steps with a prompt chunk.
DECODE_BUCKETS = (1, 4, 16, 64, 256)
PROMPT_BUCKETS = (256, 1024, 2048, 8192)


@dataclass(frozen=True)
class StepGroup:
    kind: str  # decode, prefill, mixed, or all
    size: str  # the bucket, e.g. "<=16 rows" or "<=1024 tok"
    steps: int
    measured_p50_ms: float
    predicted_p50_ms: float
    measured_s: float  # summed
    predicted_s: float

    @property
    def ratio(self) -> float:
        """Predicted over measured, summed over the group's steps (below 1: the profile prices them too cheap)."""
        return self.predicted_s / self.measured_s if self.measured_s > 0 else float("nan")


_KINDS = ("decode", "prefill", "mixed")  # in the tables' order


def _bucket(step: StepRecord) -> tuple[int, int, str]:
    """Where ``step`` sorts (its kind, then its size bucket's bound) and the bucket's label."""
    size, bounds, unit = (
        (step.decodes, DECODE_BUCKETS, "rows")
        if step.kind == "decode"
        else (step.prefill_tokens, PROMPT_BUCKETS, "tok")
    )
    bound = next((b for b in bounds if size <= b), None)
    kind = _KINDS.index(step.kind)
    return (kind, bound, f"<={bound} {unit}") if bound else (kind, bounds[-1] + 1, f">{bounds[-1]} {unit}")


def _group(kind: str, size: str, measured: list[float], predicted: list[float]) -> StepGroup:
    return StepGroup(
        kind,
        size,
        len(measured),
        float(np.median(measured)) * 1e3,
        float(np.median(predicted)) * 1e3,
        float(sum(measured)),
        float(sum(predicted)),
    )


def compare(steps: Iterable[StepRecord], profile: Profile) -> list[StepGroup]:
    """One group per kind and size present, in size order, then every step together."""
    groups: dict[tuple[int, int, str], tuple[list[float], list[float]]] = {}
    every: tuple[list[float], list[float]] = ([], [])
    for step in steps:
        price = profile.step_time(step.prefill_tokens, step.decodes, step.decode_context)
        for measured, predicted in (groups.setdefault(_bucket(step), ([], [])), every):
            measured.append(step.seconds)
            predicted.append(price)
    out = [_group(_KINDS[kind], size, m, p) for (kind, _, size), (m, p) in sorted(groups.items())]
    if every[0]:
        out.append(_group("all", "", *every))
    return out


def within(steps: Sequence[StepRecord], start: float, end: float) -> list[StepRecord]:
    return [s for s in steps if start <= s.start < end]


def to_json(groups: Sequence[StepGroup]) -> list[dict]:
    return [{**asdict(g), "ratio": g.ratio} for g in groups]


def format_table(groups: Sequence[StepGroup]) -> str:
    cells = [["step", "size", "steps", "p50 ms meas. / profile", "total s meas. / profile", "ratio"]]
    for g in groups:
        cells.append(
            [
                g.kind,
                g.size,
                str(g.steps),
                f"{g.measured_p50_ms:.2f} / {g.predicted_p50_ms:.2f}",
                f"{g.measured_s:.3f} / {g.predicted_s:.3f}",
                f"{g.ratio:.2f}",
            ]
        )
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="the SPLITSERVE_STEP_TRACE directory of a run")
    p.add_argument("--profile", required=True, help="profile YAML whose step prices to compare")
    p.add_argument(
        "--windows", metavar="JSON", help="a sim_validate.json of the same run: one table per rate (its clock_s)"
    )
    args = p.parse_args(argv)
    steps, profile = load(args.directory), load_profile(args.profile)
    if not steps:
        print(f"{args.directory}: no step trace (run with SPLITSERVE_STEP_TRACE={args.directory})", file=sys.stderr)
        return 2
    if args.windows is None:
        print(format_table(compare(steps, profile)))
        return 0
    for run in json.loads(Path(args.windows).read_text())["runs"]:
        start, end = run["clock_s"]
        print(f"rate {run['rate']:g}:\n{format_table(compare(within(steps, start, end), profile))}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
