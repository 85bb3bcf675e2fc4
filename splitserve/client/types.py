"""What the SDK returns: plain dataclasses, so callers never touch protobuf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self, TypedDict

from splitserve.server.gen import splitserve_pb2 as pb


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of ``generate`` besides the prompt; unset ones take the server defaults."""

    prompt_token_ids: list[int]
    model: str
    request_id: str
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    logprobs: bool
    session_id: str  # the conversation it continues: a placement hint (docs/api.md)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timing:
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    kv_transfer_ms: float
    prefill_worker: str
    decode_worker: str
    retries: int
    kv_exposed_ms: float  # of kv_transfer_ms, the part after the first token was sampled: what the prefill did not hide
    cached_prompt_tokens: int  # prompt tokens served from the prefill worker's prefix cache (not computed)
    kv_transfer_bytes: int  # bytes the request's KV transfer moved (0: prefilled where it decoded)


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of a stream; the last event also has finish_reason, usage and timing."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None

    @classmethod
    def from_message(cls, message: pb.GenerateResponse) -> Self:
        last = bool(message.finish_reason)
        return cls(
            request_id=message.request_id,
            text=message.text,
            token_ids=list(message.token_ids),
            logprobs=list(message.logprobs),
            finish_reason=message.finish_reason or None,
            usage=Usage(message.usage.prompt_tokens, message.usage.completion_tokens) if last else None,
            timing=Timing(
                ttft_ms=message.timing.ttft_ms,
                tpot_ms=message.timing.tpot_ms,
                e2e_ms=message.timing.e2e_ms,
                kv_transfer_ms=message.timing.kv_transfer_ms,
                prefill_worker=message.timing.prefill_worker,
                decode_worker=message.timing.decode_worker,
                retries=message.timing.retries,
                kv_exposed_ms=message.timing.kv_exposed_ms,
                cached_prompt_tokens=message.timing.cached_prompt_tokens,
                kv_transfer_bytes=message.timing.kv_transfer_bytes,
            )
            if last
            else None,
        )


class GenerateResult(TokenEvent):
    """A whole completion (``stream=False``): one event with every token, finish_reason, usage and timing."""


@dataclass(frozen=True)
class Health:
    serving: bool
    model: str
    max_model_len: int

    @classmethod
    def from_message(cls, message: pb.HealthResponse) -> Self:
        return cls(message.serving, message.model, message.max_model_len)


@dataclass(frozen=True)
class ScaleResult:
    """What a Scale call did: the workers started and removed, and a line for a person."""

    added: list[str]
    removed: list[str]
    message: str

    @classmethod
    def from_message(cls, message: pb.ScaleResponse) -> Self:
        return cls(list(message.added), list(message.removed), message.message)
