"""Data that crosses actor boundaries on the request path (router ↔ prefill worker ↔ decode worker)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from splitserve.engine.block_manager import CacheEvents
from splitserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from splitserve.kv_transfer.base import ReceiverEndpoint


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Tokens already streamed to the client before a retry; they extend the prompt on the new workers.
    resumed_token_ids: tuple[int, ...] = ()
    # Which try of the request this is (0, then 1 per retry). An abort names the attempt it ends, so a worker can
    # refuse a call of that attempt which Ray delivers after the abort (async actors do not keep call order).
    attempt: int = 0
    # The conversation the request belongs to (the APIs' session key): a placement hint for ``cache_aware``.
    session_id: str | None = None

    @property
    def engine_prompt(self) -> list[int]:
        return list(self.prompt_token_ids) + list(self.resumed_token_ids)

    @property
    def engine_params(self) -> SamplingParams:
        if not self.resumed_token_ids:
            return self.params
        return self.params.model_copy(update={"max_tokens": self.params.max_tokens - len(self.resumed_token_ids)})


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str
    logprob: float | None = None


@dataclass
class TokenBatch:
    """What a worker streams back: the tokens one request produced since its last batch."""

    request_id: str
    tokens: list[Token]
    finished: bool = False
    finish_reason: str | None = None
    attempt: int = 0  # the try of the request that produced them: a retry never receives an older try's tokens
    # With the attempt's first token: the prompt tokens its prefill (or colocated) worker took from its prefix cache.
    cached_prompt_tokens: int | None = None

    def absorb(self, later: TokenBatch) -> None:
        """Append the next batch of the same request (one message instead of two)."""
        self.tokens.extend(later.tokens)
        self.finished, self.finish_reason = later.finished, later.finish_reason
        if self.cached_prompt_tokens is None:
            self.cached_prompt_tokens = later.cached_prompt_tokens


@dataclass(frozen=True)
class StreamFailure:
    """On a worker's channel: this attempt ended there without finishing (aborted, or failed with ``error``)."""

    request_id: str
    attempt: int
    error: ServingError


@dataclass(frozen=True)
class PrefillOrder:
    """A prompt for a prefill worker, and the decode worker's receiver its KV goes to."""

    request: GenerateRequest
    endpoint: ReceiverEndpoint


@dataclass(frozen=True)
class PagesReady:
    """The decode worker's reservation for an attempt's KV, which the router hands to the prefill worker: the pages
    to fill, past the ``cached_tokens`` (whole blocks) the decode worker's prefix cache holds already."""

    request_id: str
    attempt: int
    block_ids: list[int]
    cached_tokens: int = 0


@dataclass(frozen=True)
class DecodeOrder:
    """An attempt for the decode worker that reserved its pages: admit it once its KV has landed, with the prefill
    worker's first token."""

    request_id: str
    attempt: int
    first_token: Token


@dataclass(frozen=True)
class TransferReport:
    """On a prefill worker's channel: the attempt's KV has fully landed in the decode worker's pages."""

    request_id: str
    attempt: int
    seconds: float  # from the transfer's begin (the prompt's last prefill pass) to the receiver's word
    exposed_seconds: float  # from the first token's sampling to the receiver's word: what the prefill did not hide
    bytes: int
    backend: str


# CacheEvents, on either worker's channel: its prefix cache's stored and evicted block hashes since the last ones,
# sent after each engine step that changed it, for the router's prefix index (never about one request).
ChannelItem = TokenBatch | TransferReport | StreamFailure | CacheEvents
ChannelMessage = list[ChannelItem]
"""One message of a worker's channel: every attempt's news since the last message, in order."""


class ErrorCode(enum.StrEnum):
    INVALID_ARGUMENT = "invalid_argument"  # the request itself is bad: do not retry
    RESOURCE_EXHAUSTED = "resource_exhausted"  # overloaded: the client may retry later
    UNAVAILABLE = "unavailable"  # no healthy worker / draining: retry later
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class ServingError(Exception):
    """A request that cannot complete, with a code the API maps to a gRPC status / HTTP code."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # survive Ray's pickling with the code intact
        return (ServingError, (self.code, self.message))


@dataclass
class RequestTiming:
    arrival: float
    first_token: float | None = None
    finished: float | None = None
    kv_transfer_s: float | None = None
    kv_exposed_s: float | None = None
    # Of the last attempt: prompt tokens served from the prefill worker's prefix cache (not computed), and the bytes
    # its KV transfer moved (0: run on one worker, or no transfer reported).
    cached_prompt_tokens: int | None = None
    kv_transfer_bytes: int | None = None
    prefill_worker: str | None = None
    decode_worker: str | None = None
    retries: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass
class WorkerStats:
    worker_id: str
    role: str
    queued_requests: int
    active_requests: int
    pending_prefill_tokens: int
    kv_blocks_total: int
    kv_blocks_free: int
    # Cumulative, in KV blocks: prompt blocks looked up in the prefix cache, and of those found there.
    prefix_cache_lookup_blocks: int = 0
    prefix_cache_hit_blocks: int = 0
    batch_size: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def kv_occupancy(self) -> float:
        return 1.0 - self.kv_blocks_free / max(self.kv_blocks_total, 1)
