"""Workloads: per-request arrival time, prompt length and output length, from a trace CSV or generated."""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from splitserve.simulator.errors import SimInputError

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival; times in seconds from the first arrival."""

    arrival_s: np.ndarray  # float64
    prompt_tokens: np.ndarray  # int64, >= 1
    output_tokens: np.ndarray  # int64, >= 1

    def __len__(self) -> int:
        return len(self.arrival_s)

    def head(self, n: int) -> Workload:
        return Workload(self.arrival_s[:n], self.prompt_tokens[:n], self.output_tokens[:n])

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests per second."""
        span = float(self.arrival_s[-1] - self.arrival_s[0])
        return (len(self) - 1) / span if span > 0 else float("inf")

    def at_rate(self, rate: float) -> Workload:
        """The same requests with time stretched so the mean rate is ``rate`` (keeps a trace's burst shape)."""
        return Workload(self.arrival_s * (self.rate / rate), self.prompt_tokens, self.output_tokens)


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
