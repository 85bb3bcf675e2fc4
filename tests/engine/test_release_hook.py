"""The engine names every request whose pages it frees (what the workers' release logs, and the abort-storm
benchmark's "abort to pages freed", are built on)."""

from __future__ import annotations

from collections.abc import Callable

from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams


def test_on_release_names_finished_and_aborted_requests_once_their_pages_are_back(tiny_model_dir):
    engine = Engine(EngineConfig(RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=64)))
    free = engine.blocks.num_free
    released: list[tuple[str, int]] = []
    engine.on_release = lambda request_id: released.append((request_id, engine.blocks.num_free))
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("done", [1, 2, 3], params)
    engine.add_request("dropped", [4, 5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.abort("dropped")
    while engine.has_work():
        engine.step()
    assert sorted(r for r, _ in released) == ["done", "dropped"]
    assert released[-1][1] == free  # told after the pages went back, not before
    assert not engine.abort("dropped")  # gone: nothing more to free, nobody told twice
    assert len(released) == 2


def test_a_prompt_released_while_a_pass_waits_for_the_device_is_freed_then_and_computed_no_further(tiny_model_dir):
    config = RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=64, max_batch_tokens=64)
    engine = Engine(EngineConfig(config))
    free = engine.blocks.num_free
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    short = engine.make_sequence("short", [1 + i for i in range(40)], params)
    long = engine.make_sequence("long", [1 + i % 200 for i in range(150)], params)  # 24 tokens in the first pass
    waits: list[int] = []

    def device_wait(wait: Callable[[], None]) -> None:
        waits.append(engine.blocks.num_free)
        if len(waits) == 1:  # the first pass (short's last) waits for the device: long is aborted meanwhile
            assert engine.release("long")
        wait()

    engine.device_wait = device_wait
    outputs = engine.prefill([short, long])
    assert [out.request_id for out in outputs] == ["short"]  # no first token for long, and no pass that ends it
    assert len(waits) == 1 and not long.block_table
    assert engine.release("short") and engine.blocks.num_free == free
