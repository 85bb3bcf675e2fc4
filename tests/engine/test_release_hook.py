"""The engine names every request whose pages it frees (what the workers' release logs, and the abort-storm
benchmark's "abort to pages freed", are built on)."""

from __future__ import annotations

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
