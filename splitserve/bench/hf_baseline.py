"""The HF transformers baseline: ``generate`` over the benchmark's requests in static batches, on one device.

This is what serving looks like without a serving system: a batch starts together and holds its slots until its
longest request is done. Requests are taken in order, ``batch_size`` at a time, all available at once (offline),
so latencies are measured from the start of the request's batch: no queueing is counted, which flatters the
baseline's TTFT and E2E. A timestamp per decoding step (a streamer) gives each request its own TTFT, TPOT and E2E.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splitserve.bench.metrics import OK, RequestRecord, Summary, summarize
from splitserve.bench.requests import BenchRequest
from splitserve.engine.runner import resolve_device, resolve_dtype
from splitserve.slo import SLO

LABEL = "hf-static"


class _StepClock:
    """A generate streamer that only notes when each step's tokens reach the host (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate_batch(
    model: Any, batch: Sequence[BenchRequest], pad_id: int, device: torch.device
) -> list[RequestRecord]:
    width = max(len(r.prompt_token_ids) for r in batch)
    steps = max(r.max_tokens for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):  # left padding: every prompt ends where generation starts
        ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
        mask[row, width - len(r.prompt_token_ids) :] = 1
    clock = _StepClock()
    start = time.perf_counter()
    model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=steps,
        min_new_tokens=steps,  # like ignore_eos: every row runs the batch's full length
        do_sample=False,
        pad_token_id=pad_id,
        streamer=clock,
    )
    first, t = clock.times[1], clock.times
    return [
        RequestRecord(
            r.index,
            len(r.prompt_token_ids),
            r.max_tokens,
            status=OK,
            output_tokens=r.max_tokens,
            ttft_ms=(first - start) * 1000,
            tpot_ms=(t[r.max_tokens] - first) * 1000 / (r.max_tokens - 1) if r.max_tokens > 1 else None,
            e2e_ms=(t[r.max_tokens] - start) * 1000,
        )
        for r in batch
    ]


def run_hf_baseline(
    model_dir: str | Path,
    requests: Sequence[BenchRequest],
    batch_size: int,
    slo: SLO,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[Summary, list[RequestRecord]]:
    """Load the checkpoint with HF, run every request, and summarise; ``device``/``dtype`` resolve as the engine's
    do, so ``auto`` means the same precision the cluster served."""
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=resolve_dtype(dtype, torch_device), local_files_only=True
    )
    model.to(torch_device)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    records: list[RequestRecord] = []
    with torch.inference_mode():
        # The first batch once, untimed, as the cluster gets its warmup: HF's first pass over each sequence length
        # is slow (lazy set-up; a third of its speed for an 8B model on an H100), which is not the baseline's cost.
        _generate_batch(model, requests[:batch_size], pad_id, torch_device)
        start = time.perf_counter()
        for i in range(0, len(requests), batch_size):
            records += _generate_batch(model, requests[i : i + batch_size], pad_id, torch_device)
    duration = time.perf_counter() - start
    return summarize(records, duration, slo, LABEL, rate=None), records
