"""The cluster's own overheads (a profile's ``serving``), fitted on a live run at low load and its step trace.

The profile times the engine alone; a serving worker adds hops, admission and streaming around every request, and
its busier host slows the steps with an eager prompt pass. ``sim_validate --fit-serving`` fits them here, on its
first rate, and predicts every rate with them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from splitserve.engine.step_trace import StepRecord
from splitserve.simulator import ClusterSpec, Profile, Workload, simulate, summarize
from splitserve.simulator.engine import RunResult
from splitserve.simulator.measure import best_floor
from splitserve.simulator.metrics import Percentiles
from splitserve.simulator.profile import ServingSpec
from splitserve.slo import SLO

# How close the fitted TTFT p90 must come to the measured one.
_FIT_TOLERANCE_S = 1e-7
_MAX_SLOWDOWN = 0.95  # a step beside the other pool's keeps at least 5% of its speed (the model needs < 1)
_ALONE, _BESIDE = 0.5, 0.9  # a prefill pass with less / at least this share of its time beside decode steps


def fit_prompt_step_floor(steps: Sequence[StepRecord], profile: Profile) -> float:
    """The served floor of a step with a prompt chunk: the value (0, or one of those steps' times) for which
    ``max(profile price, floor)`` is off the served steps with a chunk by the least summed log ratio. A short
    chunk's eager pass is host-bound, and a serving worker's host is busier than the profile's engine alone."""
    prompt_steps = [s for s in steps if s.prefill_tokens and s.seconds > 0]
    if not prompt_steps:
        return 0.0
    measured = np.asarray([s.seconds for s in prompt_steps])
    price = np.asarray([profile.step_time(s.prefill_tokens, s.decodes, s.decode_context) for s in prompt_steps])
    return best_floor(price, measured)[0]


def _workers(steps: Sequence[StepRecord]) -> tuple[list[list[StepRecord]], list[list[StepRecord]]]:
    """The trace's steps per worker: those that ran prompt chunks, and those that ran none."""
    by_worker: dict[int, list[StepRecord]] = defaultdict(list)
    for s in steps:
        by_worker[s.pid].append(s)
    prompting: list[list[StepRecord]] = []
    others: list[list[StepRecord]] = []
    for ws in by_worker.values():
        (prompting if any(s.prefill_tokens for s in ws) else others).append(ws)
    return prompting, others


def fit_ingress(steps: Sequence[StepRecord], arrivals_s: Sequence[float]) -> float:
    """The median wait, from its arrival to the start of the step that takes it, of a request that wakes an idle
    engine: the first arrival after a worker's step ended, where that worker's next step has a prompt chunk and no
    decodes (nothing else was running). ``arrivals_s`` on the trace's clock. 0 where there is no such step, or where
    more than one worker ran prompt steps (the trace does not say which worker an arrival went to)."""
    prompting, _ = _workers(steps)
    if len(prompting) != 1:
        return 0.0
    arrivals = sorted(arrivals_s)
    waits = []
    idle_since = -np.inf  # a run starts on an idle cluster
    for s in sorted(prompting[0], key=lambda s: s.start):
        k = bisect_right(arrivals, idle_since)
        if s.prefill_tokens and not s.decodes and k < len(arrivals) and arrivals[k] <= s.start:
            waits.append(s.start - arrivals[k])
        idle_since = s.start + s.seconds
    return float(np.median(waits)) if waits else 0.0


def _beside_s(steps: Sequence[StepRecord], others: Sequence[StepRecord]) -> np.ndarray:
    """Seconds of each of ``steps`` spent beside any of ``others`` (another worker's steps, which never overlap
    one another)."""
    spans = sorted((s.start, s.start + s.seconds) for s in others)
    starts = [a for a, _ in spans]
    beside = np.zeros(len(steps))
    for k, s in enumerate(steps):
        end = s.start + s.seconds
        i = max(0, bisect_right(starts, s.start) - 1)
        while i < len(spans) and spans[i][0] < end:
            beside[k] += max(0.0, min(spans[i][1], end) - max(spans[i][0], s.start))
            i += 1
    return beside


def _shared_pair(steps: Sequence[StepRecord]) -> tuple[list[StepRecord], list[StepRecord]] | None:
    """A trace of one prefill and one decode worker (sharing a GPU, where the caller says so): their prefill
    passes and decode steps. None for any other trace: which worker shares with which is not in it."""
    prefill, decode = _workers(steps)
    if len(prefill) != 1 or len(decode) != 1:
        return None
    return [s for s in prefill[0] if s.prefill_tokens and s.seconds > 0], [s for s in decode[0] if s.decodes]


def fit_shared_gpu_slowdown(steps: Sequence[StepRecord]) -> float:
    """Seconds a decode step gains per second of it beside a prefill pass: the least-squares slope of the decode
    steps' times on their overlap with the prefill worker's passes, for a trace of one prefill and one decode
    worker sharing a GPU (0 for any other trace)."""
    pair = _shared_pair(steps)
    if pair is None:
        return 0.0
    passes, decodes = pair
    x, y = _beside_s(decodes, passes), np.asarray([s.seconds for s in decodes])
    if len(x) < 2 or x.var() == 0:
        return 0.0
    return min(_MAX_SLOWDOWN, max(0.0, float(np.cov(x, y, bias=True)[0, 1] / x.var())))


def _passes_with_company(steps: Sequence[StepRecord]) -> list[tuple[StepRecord, float]] | None:
    """Each prefill pass of a shared-GPU pair's trace, with the share of its time that decode steps ran beside it;
    None where the trace is not of such a pair."""
    pair = _shared_pair(steps)
    if pair is None:
        return None
    passes, decodes = pair
    return [(s, b / s.seconds) for s, b in zip(passes, _beside_s(passes, decodes), strict=True)]


def passes_alone(steps: Sequence[StepRecord]) -> list[StepRecord]:
    """The prefill passes of a shared-GPU pair's trace that ran mostly without decode steps beside them: what the
    served floor of a prompt step is fitted on once the slowdown beside decode is modelled apart. The whole trace
    where there is no such pair, or no such pass."""
    passes = _passes_with_company(steps) or []
    return [s for s, share in passes if share < _ALONE] or list(steps)


def fit_shared_gpu_prefill_slowdown(steps: Sequence[StepRecord], profile: Profile, floor_s: float) -> float:
    """The share of its device speed a prefill pass loses beside the decode steps on its GPU: 1 − the median, over
    the passes that had decode steps beside them throughout, of what the pass would take alone (its price, at
    least ``floor_s``) over what it took. 0 where no pass was beside decode steps throughout, or for a trace that
    is not of one prefill and one decode worker."""
    beside = [s for s, share in _passes_with_company(steps) or [] if share >= _BESIDE]
    if not beside:
        return 0.0
    alone_over_served = [max(profile.prefill_time(s.prefill_tokens), floor_s) / s.seconds for s in beside]
    return min(_MAX_SLOWDOWN, max(0.0, 1.0 - float(np.median(alone_over_served))))


def fit_serving(
    cluster_for: Callable[[Profile], ClusterSpec],
    profile: Profile,
    workload: Workload,
    measured: dict[str, float | None],
    slo: SLO,
    steps: Sequence[StepRecord] = (),
    trace_start_s: float = 0.0,
) -> ServingSpec:
    """The cluster's own overheads from a live run at low load: with its step trace (``trace_start_s``: the
    trace's clock as the workload's arrivals began), the served floor of a step with a prompt chunk, the ingress and
    (pools sharing GPUs) the decode steps' slowdown beside prefill passes and the passes' beside decode steps (the
    floor then fitted on the passes that ran alone);
    per step, the excess of the measured median TPOT over the prediction so far; then, with those in, the
    per-request latency and the per-prompt-token one that together match the measured TTFT p50 and p90 (the
    prompt-length term widens the spread)."""

    def run(serving: ServingSpec) -> RunResult:
        return simulate(cluster_for(profile.model_copy(update={"serving": serving})), workload)

    shared = cluster_for(profile).shared_gpus
    floor_s = fit_prompt_step_floor(passes_alone(steps) if shared else steps, profile)
    traced = ServingSpec(
        prompt_step_floor_s=floor_s,
        ingress_s=fit_ingress(steps, (workload.arrival_s + trace_start_s).tolist()),
        shared_gpu_slowdown=fit_shared_gpu_slowdown(steps) if shared else 0.0,
        shared_gpu_prefill_slowdown=fit_shared_gpu_prefill_slowdown(steps, profile, floor_s) if shared else 0.0,
    )
    tpot_live, tpot_bare = measured["tpot_p50_ms"], summarize(run(traced), slo).tpot_s.p50 * 1e3
    step = traced.model_copy(
        update={"step_s": 0.0 if tpot_live is None or np.isnan(tpot_bare) else max(0.0, (tpot_live - tpot_bare) / 1e3)}
    )
    ttft_p50, ttft_p90 = measured["ttft_p50_ms"], measured["ttft_p90_ms"]
    if ttft_p50 is None or ttft_p90 is None:
        return step
    want_p50, want_p90 = ttft_p50 / 1e3, ttft_p90 / 1e3
    ttft = run(step).first_token_s - workload.arrival_s
    prompt = workload.prompt_tokens.astype(np.float64)

    def request_s(per_token_s: float) -> float:
        return max(0.0, want_p50 - Percentiles.of(ttft + per_token_s * prompt).p50)

    def p90_short_s(per_token_s: float) -> float:
        return want_p90 - Percentiles.of(ttft + request_s(per_token_s) + per_token_s * prompt).p90

    if p90_short_s(0.0) <= _FIT_TOLERANCE_S:  # already as wide as the run (one prompt length, or queueing)
        return step.model_copy(update={"request_s": request_s(0.0)})
    resolution = _FIT_TOLERANCE_S / max(1.0, float(prompt.max()))
    # The prompt term may take the whole median but no more (request_s is never negative): bound it there first.
    lo, hi = 0.0, want_p50 / max(1.0, float(np.median(prompt)))
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if request_s(mid) > 0 else (lo, mid)
    lo, hi = 0.0, lo
    if p90_short_s(hi) > 0:  # even then the spread is short: the widest that still keeps the median
        return step.model_copy(update={"prompt_token_s": hi, "request_s": request_s(hi)})
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p90_short_s(mid) > 0 else (lo, mid)
    return step.model_copy(update={"prompt_token_s": hi, "request_s": request_s(hi)})
