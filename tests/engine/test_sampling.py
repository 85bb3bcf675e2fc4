import pytest
import torch
from pydantic import ValidationError

from splitserve.engine import Engine, EngineConfig, RequestError, RunnerConfig, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(EngineConfig(RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=128)))


PROMPT = list(range(40, 60))


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    alone = engine.generate([PROMPT], p)[0].token_ids
    other = SamplingParams(max_tokens=16, temperature=0.7, seed=9, ignore_eos=True)
    batched = engine.generate([list(range(5)), PROMPT], [other, p])[1].token_ids
    assert alone == batched
    assert engine.generate([PROMPT], p.model_copy(update={"seed": 124}))[0].token_ids != alone


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    k1 = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=1, ignore_eos=True))[
        0
    ].token_ids
    assert k1 == greedy


def test_stop_token_and_max_tokens(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 10
    stop_at = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_at)
    stopped = engine.generate([PROMPT], SamplingParams(max_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy.token_ids[: first + 1]


def test_stop_string_truncates_text(engine):
    prompt = engine.encode("The quick brown fox")
    full = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    visible = full.text.replace("\ufffd", "")
    if len(visible) < 4:
        pytest.skip("the random tiny model produced no printable text for this prompt")
    stop = visible[2:4]
    out = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and stop not in out.text and full.text.startswith(out.text)


def test_logprobs_are_log_probabilities(engine):
    out = engine.generate([PROMPT], SamplingParams(max_tokens=5, logprobs=True, ignore_eos=True))[0]
    assert len(out.logprobs) == 5 and all(lp <= 0.0 for lp in out.logprobs)


def test_bad_requests_name_the_field(engine):
    with pytest.raises(RequestError, match="prompt: empty"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(RequestError, match="prompt_token_ids"):
        engine.add_request("b", [10**6], SamplingParams())
    with pytest.raises(RequestError, match="context"):
        engine.add_request("c", [1] * engine.max_model_len, SamplingParams())
    with pytest.raises(ValidationError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValidationError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


def test_abort_frees_pages_at_once(engine):
    free = engine.blocks.num_free
    engine.add_request("x", list(range(100)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.blocks.num_free < free
    assert engine.abort("x") and not engine.abort("x")
    assert engine.blocks.num_free == free and not engine.has_work()


@pytest.mark.gpu
def test_gpu_greedy_matches_cpu_in_float32(tiny_model_dir):
    prompts = [list(range(3, 30)), list(range(100, 105))]
    p = SamplingParams(max_tokens=8, ignore_eos=True)
    cpu = Engine(EngineConfig(RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=64)))
    gpu = Engine(EngineConfig(RunnerConfig(str(tiny_model_dir), device="cuda", dtype="float32", num_kv_blocks=64)))
    assert torch.cuda.is_available()
    assert [r.token_ids for r in gpu.generate(prompts, p)] == [r.token_ids for r in cpu.generate(prompts, p)]
