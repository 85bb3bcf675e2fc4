"""The hand-off timeline from ``splitserve.handoff_trace`` files: per event, milliseconds relative to the prefill's
last layer, or to another ``--anchor`` (p10/p50/p90 over requests).

    SPLITSERVE_HANDOFF_TRACE=/tmp/handoff python benchmarks/serve.py ...
    python -m splitserve.bench.handoff_report /tmp/handoff
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from splitserve.bench.metrics import percentiles
from splitserve.handoff_trace import EVENTS

ANCHOR = "prefill.last_layer"


def load(directory: Path) -> dict[str, dict[str, float]]:
    """request id -> event -> its earliest time (a retried request keeps its first attempt's)."""
    events: dict[str, dict[str, float]] = defaultdict(dict)
    for path in directory.glob("*.log"):
        for line in path.read_text().splitlines():
            clock, event, request_id = line.split(" ", 2)
            seen = events[request_id]
            seen[event] = min(float(clock), seen.get(event, float("inf")))
    return dict(events)


def timeline(
    events: dict[str, dict[str, float]], anchor: str = ANCHOR
) -> list[tuple[str, int, dict[str, float | None]]]:
    """(event, requests, percentiles of ms since ``anchor``) for each event seen, in ``EVENTS`` order."""
    offsets: dict[str, list[float]] = defaultdict(list)
    for seen in events.values():
        if anchor not in seen:
            continue
        for event, clock in seen.items():
            offsets[event].append((clock - seen[anchor]) * 1e3)
    return [(e, len(offsets[e]), percentiles(offsets[e], (10, 50, 90))) for e in EVENTS if offsets[e]]


def format_timeline(events: dict[str, dict[str, float]], anchor: str = ANCHOR) -> str:
    lines = [
        f"{len(events)} requests; ms since {anchor}",
        f"{'event':24s} {'n':>5s} {'p10':>9s} {'p50':>9s} {'p90':>9s}",
    ]
    for event, n, p in timeline(events, anchor):
        lines.append(f"{event:24s} {n:5d}" + "".join(f" {v:9.2f}" for v in p.values() if v is not None))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path)
    ap.add_argument(
        "--anchor",
        default=ANCHOR,
        choices=EVENTS,
        help="the event each request's times count from; router.reserve times the first token's whole path",
    )
    args = ap.parse_args(argv)
    print(format_timeline(load(args.directory), args.anchor))


if __name__ == "__main__":
    main()
