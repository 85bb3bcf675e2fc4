"""The one place an API request becomes a GenerateRequest, or an INVALID_ARGUMENT ServingError naming the field.

Both APIs come through here (the gRPC message as a dict, the HTTP body as parsed JSON) so a bad value gets the
same message whichever way it arrived, and nothing malformed ever reaches the cluster.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splitserve.cluster.messages import ErrorCode, GenerateRequest, ServingError
from splitserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams

# OpenAI's default for /v1/completions; chat requests default to the rest of the context, as OpenAI does.
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_SESSION_ID_CHARS = 256  # the router remembers sessions by this key: bounded, as any key it keeps
_TYPE_TAGS = frozenset({"str", "int", "float", "bool"})
_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True)
class ValidationContext:
    """What validation needs to know about the served model, without depending on the cluster."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int  # the model's, not len(tokenizer): its answers may hold ids past the tokenizer's
    served_name: str
    max_request_bytes: int


@dataclass(frozen=True)
class ApiRequest:
    generate: GenerateRequest
    stream: bool = False
    include_usage: bool = False


def invalid(field: str, message: str) -> ServingError:
    return ServingError(ErrorCode.INVALID_ARGUMENT, f"{field}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _StreamOptions(_Strict):
    include_usage: bool = False


class _Body(_Strict):
    model: str | None = None
    request_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    # Chat sends a bool, completions an int (we return the sampled token's logprob either way).
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | bool | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Literal[1] | None = None
    user: str | None = None  # OpenAI's end-user id: the session key unless one is given explicitly
    session_id: str | None = Field(None, min_length=1, max_length=MAX_SESSION_ID_CHARS)


class _CompletionBody(_Body):
    prompt: str | list[int] | None = None
    prompt_token_ids: list[int] | None = None


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _ChatBody(_Body):
    messages: list[_ChatMessage] = Field(min_length=1)


def check_size(nbytes: int, limit: int) -> None:
    if nbytes > limit:
        raise invalid("request", f"{nbytes} bytes, more than server.max_request_bytes ({limit})")


def parse_json(raw: bytes, limit: int) -> Any:
    check_size(len(raw), limit)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise invalid("body", f"not valid JSON ({str(err)[:200]})") from None


def parse_completion(body: Any, ctx: ValidationContext, session_header: str | None = None) -> ApiRequest:
    """A /v1/completions body or a gRPC GenerateRequest (as a dict). ``session_header``: HTTP's x-session-id."""
    data = _validate(_CompletionBody, body)
    if (data.prompt is None) == (data.prompt_token_ids is None):
        raise invalid("prompt", "give exactly one of prompt (text or token ids) or prompt_token_ids")
    if data.prompt_token_ids is not None:
        ids = _check_ids(data.prompt_token_ids, ctx, "prompt_token_ids")
    elif isinstance(data.prompt, list):
        ids = _check_ids(data.prompt, ctx, "prompt")
    else:
        ids = _tokenize(str(data.prompt), ctx, "prompt", add_special_tokens=True)
    return _build(data, ids, ctx, "prompt", DEFAULT_COMPLETION_MAX_TOKENS, session_header)


def parse_chat(body: Any, ctx: ValidationContext, session_header: str | None = None) -> ApiRequest:
    """A /v1/chat/completions body: the messages go through the model's chat template."""
    data = _validate(_ChatBody, body)
    messages = [{"role": m.role, "content": m.text} for m in data.messages]
    try:
        text = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # templates raise anything they like (jinja errors, raise_exception, ValueError)
        raise invalid("messages", f"the model's chat template rejected them ({str(err)[:200]})") from None
    ids = _tokenize(text, ctx, "messages", add_special_tokens=False)
    return _build(data, ids, ctx, "messages", None, session_header)


def _validate(model: type[_M], body: Any) -> _M:
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise _from_pydantic(err) from None


def _from_pydantic(err: ValidationError) -> ServingError:
    first = err.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # cross-field checks already start with the field they are about
        return ServingError(ErrorCode.INVALID_ARGUMENT, message)
    return invalid(".".join(_path_part(p) for p in first["loc"] if not _is_type_tag(p)) or "body", message)


def _is_type_tag(part: str | int) -> bool:
    """Pydantic puts union members ("str", "list[int]") in error locations; they are not fields."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


def _path_part(part: str | int) -> str:
    return str(part) if isinstance(part, int) or part.isidentifier() else repr(part)


def _check_ids(ids: list[int], ctx: ValidationContext, field: str) -> list[int]:
    if not ids:
        raise invalid(field, "is empty")
    bad = next((t for t in ids if not 0 <= t < ctx.vocab_size), None)
    if bad is not None:
        raise invalid(field, f"token id {bad} is outside the model's vocabulary [0, {ctx.vocab_size})")
    return ids


def _tokenize(text: str, ctx: ValidationContext, field: str, add_special_tokens: bool) -> list[int]:
    if not text:
        raise invalid(field, "is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(field, "is not valid Unicode (lone surrogate)") from None
    return list(ctx.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _session(data: _Body, header: str | None) -> str | None:
    """The request's session key: the x-session-id header, else ``session_id``, else OpenAI's ``user``."""
    for name, value in (("x-session-id", header), ("session_id", data.session_id), ("user", data.user)):
        if value is None:
            continue
        if not 0 < len(value) <= MAX_SESSION_ID_CHARS:
            raise invalid(name, f"{len(value)} characters; a session key has 1 to {MAX_SESSION_ID_CHARS}")
        return value
    return None


def _build(
    data: _Body, ids: list[int], ctx: ValidationContext, field: str, default_max: int | None, session_header: str | None
) -> ApiRequest:
    if data.model is not None and data.model != ctx.served_name:
        raise invalid("model", f"unknown model {data.model!r} (this server serves {ctx.served_name!r})")
    n = len(ids)
    room = ctx.max_model_len - n
    if room < 1:
        raise invalid(field, f"{n} tokens, the model's context is {ctx.max_model_len} (fix: shorten it)")
    max_tokens = data.max_tokens if data.max_tokens is not None else min(default_max or room, room)
    if max_tokens < 1:
        raise invalid("max_tokens", f"must be at least 1, got {max_tokens}")
    if max_tokens > room:
        raise invalid(
            "max_tokens",
            f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {ctx.max_model_len}"
            f" tokens (fix: max_tokens <= {room})",
        )
    optional = {
        "temperature": data.temperature,
        "top_k": data.top_k,
        "top_p": data.top_p,
        "seed": data.seed,
        "ignore_eos": data.ignore_eos,
        "stop_token_ids": tuple(data.stop_token_ids) if data.stop_token_ids is not None else None,
    }
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            stop=(data.stop,) if isinstance(data.stop, str) else tuple(data.stop or ()),
            logprobs=bool(data.logprobs),
            **{k: v for k, v in optional.items() if v is not None},
        )
    except ValidationError as err:
        raise _from_pydantic(err) from None
    request = GenerateRequest(
        data.request_id or uuid.uuid4().hex, ids, params, session_id=_session(data, session_header)
    )
    include_usage = data.stream_options is not None and data.stream_options.include_usage
    return ApiRequest(request, stream=data.stream, include_usage=include_usage)
