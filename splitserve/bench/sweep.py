"""A load sweep against one cluster: the same requests at each offered rate, and the best rate that meets the SLOs."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

from splitserve.bench.loadgen import run_load
from splitserve.bench.metrics import RequestRecord, Summary, max_goodput, summarize
from splitserve.bench.requests import BenchRequest, WorkloadSpec, make_requests
from splitserve.client import AsyncClient
from splitserve.simulator.workload import Workload
from splitserve.slo import SLO


@dataclass(frozen=True)
class RateRun:
    summary: Summary
    records: list[RequestRecord]
    clock_s: tuple[float, float] = (0.0, 0.0)  # time.perf_counter() as the run began and ended (the host's clock)


@dataclass(frozen=True)
class SweepResult:
    label: str
    max_model_len: int
    runs: list[RateRun]

    @property
    def best(self) -> Summary | None:
        return max_goodput([r.summary for r in self.runs])

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "label": self.label,
            "max_model_len": self.max_model_len,
            "max_goodput": None if best is None else {"rate": best.rate, "goodput_req_s": best.goodput_req_s},
            "runs": [
                {"summary": r.summary.to_json(), "records": [asdict(rec) for rec in r.records]} for r in self.runs
            ],
        }


_WARMUP_RUN = 2**31  # the warmup's prompts: a run number no sweep reaches


def warmup_requests(workload: Workload, max_model_len: int, seed: int, n: int) -> list[BenchRequest]:
    """``n`` requests shaped as the workload's first ones, all sent at once: compiles kernels and fills allocators
    before anything counts. Their prompts are their own (a run number no rate uses): the first run's requests
    would otherwise hit the prefix cache and compute a few tokens of their prompts (11 of 731 on an H200 once)."""
    return [replace(r, arrival_s=0.0) for r in make_requests(workload, max_model_len, seed=seed, run=_WARMUP_RUN)[:n]]


async def run_sweep(
    address: str,
    spec: WorkloadSpec,
    rates: Sequence[float | None],
    slo: SLO,
    label: str,
    *,
    warmup: int = 2,
    timeout_s: float | None = None,
    token: str | None = None,
) -> SweepResult:
    """Each rate runs to completion before the next starts, so every run begins on an idle cluster."""
    async with AsyncClient(address, token=token, retries=0) as client:
        max_model_len = (await client.health()).max_model_len
        runs = []
        for i, rate in enumerate(rates):
            workload = spec.workload(rate)
            requests = make_requests(workload, max_model_len, seed=spec.seed, run=i)
            if i == 0 and warmup:
                await run_load(client, warmup_requests(workload, max_model_len, spec.seed, warmup), timeout_s)
            began = time.perf_counter()
            records, duration = await run_load(client, requests, timeout_s)
            offered = rate if rate is not None else workload.rate
            runs.append(
                RateRun(summarize(records, duration, slo, label, offered), records, (began, time.perf_counter()))
            )
    return SweepResult(label, max_model_len, runs)


async def run_sweep_apart(*args: Any, **kwargs: Any) -> SweepResult:
    """``run_sweep`` (the same arguments, picklable) from a process of its own, for a cluster served from this one:
    a load generator in the server's process shares its interpreter lock and event loop, and every token it reads
    slows the server it measures (a real client runs elsewhere too)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(_sweep_in_process, *args, **kwargs)
        return await asyncio.wrap_future(job)


def _sweep_in_process(*args: Any, **kwargs: Any) -> SweepResult:
    """In the spawned process: the sweep on an event loop of its own (a coroutine cannot cross processes)."""
    return asyncio.run(run_sweep(*args, **kwargs))
