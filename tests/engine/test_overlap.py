"""Overlapped decode steps (``overlap.py``) give exactly the tokens of ordinary steps, end requests at the same
token, and never free a page that a step in flight still writes.

On the CPU the forward is synchronous, so there the pipeline is exercised for its bookkeeping (placeholders, tokens
fed on the device, deferred frees); the GPU variants (float32, so that batch shapes cannot flip a token) run it where
it overlaps, through the CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams
from splitserve.engine.testing import hf_greedy_reference
from tests.support import serve_arriving

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _engine(model_dir, overlap: bool, device: str = "cpu", **runner_kw) -> Engine:
    runner_kw.setdefault("num_kv_blocks", 256)
    runner_kw.setdefault("block_size", 8)
    runner = RunnerConfig(str(model_dir), device=device, dtype="float32", **runner_kw)
    return Engine(EngineConfig(runner, overlap_decode=overlap))


def _prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


class LaunchLog:
    """Records every forward the runner launches: which requests, how many prompt chunks, and whether inputs were
    fed on the device."""

    def __init__(self, engine: Engine):
        self.launches: list[tuple[list[str], int, bool]] = []
        launch = engine.runner.launch

        def recorded(prefill_chunks, decode_seqs, layer_hook=None, feed=None):
            ids = [s.request_id for s, _ in prefill_chunks] + [s.request_id for s in decode_seqs]
            self.launches.append((ids, len(prefill_chunks), feed is not None))
            return launch(prefill_chunks, decode_seqs, layer_hook, feed)

        engine.runner.launch = recorded

    def rows_of(self, request_id: str) -> int:
        return sum(ids.count(request_id) for ids, _, _ in self.launches)

    @property
    def fed(self) -> int:
        return sum(fed for _, _, fed in self.launches)

    @property
    def fed_mixed(self) -> int:
        """Steps with prompt chunks launched before the step in flight was read back."""
        return sum(fed and chunks > 0 for _, chunks, fed in self.launches)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_equals_hf_with_requests_arriving_midserve_arriving(tiny_model_dir, device):
    prompts = _prompts(seed=21, lengths=(3, 17, 40, 9, 28))
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 1, 7, 12, 2)]
    engine = _engine(tiny_model_dir, overlap=True, device=device)
    log = LaunchLog(engine)
    tokens, finished, _ = serve_arriving(engine, list(zip(prompts, params, strict=True)), arrive_every=3)
    hf = hf_greedy_reference(tiny_model_dir, prompts, 12)
    assert [tokens[f"r{i}"] for i in range(5)] == [ref[: p.max_tokens] for ref, p in zip(hf, params, strict=True)]
    assert set(finished.values()) == {"length"}
    assert log.fed > 5  # most decode steps took their inputs from the step before, on the device
    assert log.fed_mixed >= 3  # prompts arriving mid-run were launched beside fed decodes, not after a read-back
    # a request that ends by length is never computed past its last token: its prompt, then one row per token
    assert [log.rows_of(f"r{i}") for i in range(5)] == [p.max_tokens for p in params]
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_work()


@pytest.mark.parametrize("device", DEVICES)
def test_same_tokens_text_and_endings_as_ordinary_steps(tiny_model_dir, device):
    """Stop tokens, stop strings, EOS, logprobs and seeded sampling end and stream exactly as without overlap."""
    plain = _engine(tiny_model_dir, overlap=False, device=device)
    prompt = plain.encode("The quick brown fox")
    greedy = plain.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    visible = greedy.text.replace("\ufffd", "")
    requests = [
        (prompt, SamplingParams(max_tokens=20, stop_token_ids=(greedy.token_ids[4],), ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=20, temperature=0.9, seed=5, logprobs=True, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=20)),  # stops at the tiny model's EOS, if it samples it
        (prompt[:3], SamplingParams(max_tokens=6, logprobs=True, ignore_eos=True)),
    ]
    if len(visible) >= 4:
        requests.append((prompt, SamplingParams(max_tokens=20, ignore_eos=True, stop=(visible[2:4],))))
    expected = serve_arriving(_engine(tiny_model_dir, overlap=False, device=device), requests, arrive_every=2)
    overlapped = _engine(tiny_model_dir, overlap=True, device=device)
    log = LaunchLog(overlapped)
    assert serve_arriving(overlapped, requests, arrive_every=2) == expected
    assert expected[1]["r0"] == "stop" and log.fed > 0
    assert overlapped.blocks.num_free == overlapped.blocks.num_blocks


@pytest.mark.parametrize("device", DEVICES)
def test_a_stopped_request_has_one_token_computed_past_its_end_and_none_kept(tiny_model_dir, device):
    engine = _engine(tiny_model_dir, overlap=True, device=device)
    greedy = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    stop_at = greedy.index(greedy[5])
    log = LaunchLog(engine)
    result = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=10, stop_token_ids=(greedy[5],)))[0]
    assert result.token_ids == greedy[: stop_at + 1] and result.finish_reason == "stop"
    request_id = result.request_id
    # prefill + one row per decoded token + one row computed after the stop token and thrown away
    assert log.rows_of(request_id) == 1 + stop_at + 1
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("device", DEVICES)
def test_pages_of_a_request_aborted_mid_step_come_back_after_that_step_is_read(tiny_model_dir, device):
    engine = _engine(tiny_model_dir, overlap=True, device=device, num_kv_blocks=32)
    released: list[str] = []
    engine.on_release = released.append
    engine.add_request("keep", [1, 2, 3, 4], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("drop", [9, 8, 7], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()  # prefill, read back at once
    engine.step()  # the first overlapped decode step is in flight
    free = engine.blocks.num_free
    assert engine.abort("drop")
    assert released == [] and engine.blocks.num_free == free  # the step in flight still writes its KV
    outputs = engine.step()  # launches the next step, reads the one in flight: "drop" is skipped
    assert [o.request_id for o in outputs] == ["keep"]
    assert released == ["drop"] and engine.blocks.num_free > free
    assert engine.abort("keep")
    while engine.has_work():
        assert engine.step() == []
    assert released == ["drop", "keep"] and engine.blocks.num_free == engine.blocks.num_blocks
