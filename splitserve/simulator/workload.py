"""Workloads: per-request arrival time, prompt length and output length, from a trace CSV or generated."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from splitserve.simulator.errors import SimInputError

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class Conversations:
    """Which requests are turns of one conversation (per request, like the workload's arrays). A follow-up turn
    arrives ``think_s`` after the client got its previous turn's last token, which only the run knows: its
    ``arrival_s`` is NaN in the workload, and the run's result has the arrival it got."""

    conversation: np.ndarray  # int64
    turn: np.ndarray  # int64, 0 on a first turn
    previous: np.ndarray  # int64: the previous turn's request, always before this one; -1 on a first turn
    prefix_tokens: np.ndarray  # int64: leading prompt tokens equal to the previous turn's prompt + answer
    think_s: np.ndarray  # float64

    def head(self, n: int) -> Conversations:
        return Conversations(*(a[:n] for a in _columns(self)))


def _columns(obj: Any) -> tuple:
    """A dataclass's fields in order, not copied (``dataclasses.astuple`` deep-copies every array)."""
    return tuple(getattr(obj, f.name) for f in fields(obj))


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival (follow-up turns, whose arrival the run decides, after every first turn); times in
    seconds from the first arrival."""

    arrival_s: np.ndarray  # float64
    prompt_tokens: np.ndarray  # int64, >= 1
    output_tokens: np.ndarray  # int64, >= 1
    conversations: Conversations | None = None

    def __len__(self) -> int:
        return len(self.arrival_s)

    def head(self, n: int) -> Workload:
        conv = None if self.conversations is None else self.conversations.head(n)
        return Workload(self.arrival_s[:n], self.prompt_tokens[:n], self.output_tokens[:n], conv)

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests per second."""
        span = float(self.arrival_s[-1] - self.arrival_s[0])
        return (len(self) - 1) / span if span > 0 else float("inf")

    def at_rate(self, rate: float) -> Workload:
        """The same requests with time stretched so the mean rate is ``rate`` (keeps a trace's burst shape)."""
        return Workload(self.arrival_s * (self.rate / rate), self.prompt_tokens, self.output_tokens, self.conversations)


def multiturn(conversations: Sequence[Sequence[tuple[int, int, float]]]) -> Workload:
    """Conversation c's turn k is ``conversations[c][k]`` = (new message tokens, answer tokens, think seconds); its
    prompt is every earlier message and answer plus its message. A first turn arrives its think time after 0.
    Requests are ordered by turn, then by their conversation's first arrival."""
    order = sorted((k, conv[0][2], c) for c, conv in enumerate(conversations) for k in range(len(conv)))
    index = {(c, k): i for i, (k, _, c) in enumerate(order)}
    contexts = [np.cumsum([0] + [m + a for m, a, _ in conv]) for conv in conversations]
    columns: list[list[Any]] = [[] for _ in range(8)]
    for k, _, c in order:
        message, answer, think = conversations[c][k]
        prefix = int(contexts[c][k])
        row = (np.nan if k else think, prefix + message, answer, c, k, index[(c, k - 1)] if k else -1, prefix, think)
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    arrival, prompt, output, *conv = (np.asarray(col) for col in columns)
    return Workload(arrival.astype(np.float64), prompt, output, Conversations(*conv))


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: ``fixed:N`` (or just ``N``), ``uniform:LO:HI``, ``lognormal:MEDIAN:SIGMA``."""

    kind: Literal["fixed", "uniform", "lognormal"]
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, flag: str) -> LengthDist:
        parts = text.split(":")
        fix = f"(fix: {flag} N, {flag} uniform:LO:HI or {flag} lognormal:MEDIAN:SIGMA)"
        try:
            if len(parts) == 1 or (parts[0] == "fixed" and len(parts) == 2):
                dist = cls("fixed", float(parts[-1]))
            elif parts[0] in ("uniform", "lognormal") and len(parts) == 3:
                dist = cls(parts[0], float(parts[1]), float(parts[2]))  # type: ignore[arg-type]
            else:
                raise ValueError
        except ValueError:
            raise SimInputError(f"{flag}: cannot read {text!r} {fix}") from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or (dist.kind == "lognormal" and dist.b < 0):
            raise SimInputError(f"{flag}: {text!r} has impossible bounds (lengths are >= 1) {fix}")
        return dist

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n, dtype=np.int64)
        else:
            x = rng.lognormal(np.log(self.a), self.b, size=n)
        return np.maximum(1, np.rint(x)).astype(np.int64)


def synthetic(
    *,
    rate: float,
    num_requests: int,
    prompt: LengthDist,
    output: LengthDist,
    arrival: Literal["poisson", "gamma"] = "poisson",
    cv: float = 1.0,
    seed: int = 0,
) -> Workload:
    """Renewal-process arrivals at ``rate`` req/s; gamma inter-arrivals with coefficient of variation ``cv``."""
    if not rate > 0:
        raise SimInputError(f"--rate: must be > 0, got {rate} (fix: pass requests per second, e.g. --rate 10)")
    if num_requests < 1:
        raise SimInputError(f"--num-requests: must be >= 1, got {num_requests}")
    if arrival == "gamma" and not cv > 0:
        raise SimInputError(f"--cv: must be > 0 for gamma arrivals, got {cv}")
    rng = np.random.default_rng(seed)
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, size=num_requests)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=num_requests)
    gaps[0] = 0.0
    return Workload(np.cumsum(gaps), prompt.sample(rng, num_requests), output.sample(rng, num_requests))


def _timestamps(values: list[str], path: Path) -> np.ndarray:
    """Seconds as numbers, or datetime strings (the Azure trace's ``2023-11-16 18:15:46.6805900``)."""
    try:
        return np.asarray([float(v) for v in values])
    except ValueError:
        pass
    try:
        # numpy parses ISO dates with up to 9 fractional digits; the trace's 7 are fine
        stamps = np.asarray([v.strip().replace(" ", "T") for v in values], dtype="datetime64[ns]")
    except ValueError as err:
        raise SimInputError(
            f"--trace {path}: TIMESTAMP {err} (fix: seconds or 'YYYY-MM-DD HH:MM:SS[.fff]' datetimes)"
        ) from None
    return (stamps - stamps.min()).astype(np.int64) / 1e9


def load_trace(path: str | Path, limit: int | None = None) -> Workload:
    """Read an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    p = Path(path)
    if not p.is_file():
        raise SimInputError(f"--trace: no file {p} (fix: pass an Azure LLM inference trace CSV)")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in TRACE_COLUMNS if c not in header]
        if missing:
            raise SimInputError(
                f"--trace {p}: missing column {', '.join(missing)} (fix: header must have {', '.join(TRACE_COLUMNS)};"
                f" found {', '.join(header) or 'none'})"
            )
        reader.fieldnames = header
        rows = list(itertools.islice(reader, limit))
    if not rows:
        raise SimInputError(f"--trace {p}: no requests (fix: the CSV needs at least one data row)")
    try:
        prompt = np.asarray([int(r["ContextTokens"]) for r in rows], dtype=np.int64)
        output = np.asarray([int(r["GeneratedTokens"]) for r in rows], dtype=np.int64)
    except (TypeError, ValueError):
        raise SimInputError(
            f"--trace {p}: ContextTokens/GeneratedTokens must be integers (fix: clean the CSV)"
        ) from None
    t = _timestamps([r["TIMESTAMP"] for r in rows], p)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    # zero-token rows exist in the public traces; a request still costs one prompt and one output token
    return Workload(t, np.maximum(prompt[order], 1), np.maximum(output[order], 1))
