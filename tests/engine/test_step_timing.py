"""Step time split into host work and device wait: the wait is only the blocking part, every step is counted."""

from __future__ import annotations

import time

import pytest

from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams
from splitserve.engine.step_timing import StepTimes


def test_only_the_blocking_wait_counts_as_device_time():
    times = StepTimes()

    def hook(blocking):  # a worker's wait: its own work around the blocking call is host time
        time.sleep(0.02)
        blocking()

    start = time.perf_counter()
    times.timed_wait(hook)(lambda: time.sleep(0.05))
    total = time.perf_counter() - start
    times.add_step(total, 0.0)
    assert times.device_wait_s >= 0.05
    assert times.host_s >= 0.02  # the hook's own sleep is host time, however late the scheduler wakes it
    assert times.host_s + times.device_wait_s == pytest.approx(total)
    assert times.as_extra()["engine_steps_total"] == 1.0


def test_an_engine_counts_each_step_and_prefill_pass(tiny_model_dir):
    engine = Engine(EngineConfig(RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=64, block_size=8)))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", [5 + i] * (9 + i), params)
    start, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    wall = time.perf_counter() - start
    times = engine.step_times
    assert times.steps == steps >= 6
    assert times.host_s > 0 and times.device_wait_s >= 0
    assert times.host_s + times.device_wait_s <= wall
    engine.prefill([engine.make_sequence("p", [3] * 20, SamplingParams(max_tokens=1))])
    assert times.steps == steps + 1
