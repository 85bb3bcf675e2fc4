"""The benchmark's requests: when each is sent, its prompt as token ids, and how many tokens it must produce.

Arrivals and lengths come from ``splitserve.simulator.workload`` (Poisson or an Azure trace), so the benchmark and
the capacity planner read workloads the same way. Prompts are random token ids, never text: the prompt length is
then exact whatever the tokenizer, and random prompts share no prefix, so the prefix cache cannot flatter a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitserve.simulator.workload import LengthDist, Workload, load_trace, synthetic

# Ids below 256 are valid in every tokenizer the engine loads (the byte tokenizer has 259 entries).
PROMPT_VOCAB = 256


@dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival_s: float  # when to send it, from the start of the run
    prompt_token_ids: list[int]
    max_tokens: int  # sent with ignore_eos, so the request produces exactly this many tokens


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send at every rate of a sweep: the same prompts and lengths each time, only arrivals differ."""

    num_requests: int
    prompt: LengthDist
    output: LengthDist
    seed: int = 0
    trace: str | None = None  # an Azure trace CSV: its lengths, and its burst shape stretched to each rate

    def workload(self, rate: float | None) -> Workload:
        """Arrivals at ``rate`` req/s; None keeps a trace's own timing."""
        if self.trace is not None:
            trace = load_trace(self.trace, limit=self.num_requests)
            return trace if rate is None or len(trace) < 2 else trace.at_rate(rate)
        if rate is None:
            raise ValueError("rate: a synthetic workload needs a rate (fix: pass --rates, or --trace CSV)")
        # Gaps are drawn before lengths from one seeded generator, so every rate gets the same lengths.
        return synthetic(
            rate=rate, num_requests=self.num_requests, prompt=self.prompt, output=self.output, seed=self.seed
        )


def make_requests(workload: Workload, max_model_len: int, seed: int = 0, run: int = 0) -> list[BenchRequest]:
    """Requests for ``workload``, each clipped to fit ``max_model_len`` (prompt first keeps at least one output).

    ``run`` numbers the runs of a sweep: each gets its own prompt tokens (the lengths stay the workload's), so a
    later run's prompts are not prefix-cache hits of an earlier run's, which would measure another workload.
    """
    rng = np.random.default_rng([seed, run])
    requests = []
    for i, (arrival, prompt_len, output_len) in enumerate(
        zip(workload.arrival_s, workload.prompt_tokens, workload.output_tokens, strict=True)
    ):
        prompt_len = int(min(prompt_len, max_model_len - 1))
        max_tokens = int(min(output_len, max_model_len - prompt_len))
        ids = rng.integers(0, PROMPT_VOCAB, size=prompt_len).tolist()
        requests.append(BenchRequest(i, float(arrival), ids, max_tokens))
    return requests
