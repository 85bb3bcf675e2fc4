"""Fuzz validation.py: any JSON body either validates or raises INVALID_ARGUMENT, never anything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from splitserve.cluster.messages import ErrorCode, ServingError
from splitserve.engine.testing import build_byte_tokenizer
from splitserve.server.validation import ValidationContext, parse_chat, parse_completion, parse_json

CTX = ValidationContext(
    build_byte_tokenizer(), max_model_len=64, vocab_size=300, served_name="m", max_request_bytes=4096
)
FUZZ = settings(
    database=DirectoryBasedExampleDatabase(str(Path(__file__).parent / "fuzz_corpus")), max_examples=150, deadline=None
)
FIELDS = [
    "prompt", "prompt_token_ids", "messages", "model", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
    "stop_token_ids", "ignore_eos", "logprobs", "stream", "stream_options", "n", "request_id", "role", "content",
]  # fmt: skip
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=80)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4)
)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=6)


def _accepts_or_invalid(parse, body) -> None:
    try:
        request = parse(body, CTX).generate
    except ServingError as err:
        assert err.code == ErrorCode.INVALID_ARGUMENT and ":" in err.message
        return
    assert 0 < len(request.prompt_token_ids) + request.params.max_tokens <= CTX.max_model_len


@FUZZ
@given(bodies)
@example({"prompt": "\ud800"})
@example({"prompt": "hi", "max_tokens": 2**70})
@example({"prompt": "hi", "temperature": float("nan")})
@example({"prompt": [True, 1]})
@example({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]})
@example({"prompt": "hi", "stop": "", "seed": -1})
def test_completion_bodies(body):
    _accepts_or_invalid(parse_completion, body)
    _accepts_or_invalid(parse_chat, body)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
@example(b"[" * 3000)
@example(b"\xff\xfe{}")
@example(json.dumps({"prompt": "x" * 5000}).encode())
def test_raw_bytes(raw):
    try:
        body = parse_json(raw, CTX.max_request_bytes)
    except ServingError as err:
        assert err.code == ErrorCode.INVALID_ARGUMENT
        return
    _accepts_or_invalid(parse_completion, body)


def test_token_ids_are_checked_against_the_models_vocabulary_not_the_tokenizers():
    """A padded embedding table has more rows than the tokenizer has ids: the model may answer with such an id, and a
    follow-up turn that resends the answer must be served."""
    assert len(CTX.tokenizer) < 280 < CTX.vocab_size
    assert parse_completion({"prompt": [1, 280], "max_tokens": 2}, CTX).generate.prompt_token_ids == [1, 280]
    with pytest.raises(ServingError, match=r"prompt.*model's vocabulary \[0, 300\)") as err:
        parse_completion({"prompt": [1, CTX.vocab_size]}, CTX)
    assert err.value.code == ErrorCode.INVALID_ARGUMENT
