"""What the sync and async clients share: request building, the retry policy, deadlines, channel credentials."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from splitserve.client.types import GenerateOptions
from splitserve.server.gen import splitserve_pb2 as pb


def build_request(prompt: str | None, options: GenerateOptions) -> pb.GenerateRequest:
    """The request id is chosen here, so a retry reuses it and the caller can Cancel it."""
    fields: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    fields.setdefault("request_id", uuid.uuid4().hex)
    return pb.GenerateRequest(prompt=prompt or "", **fields)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, on UNAVAILABLE only and never once a token arrived (no duplicates)."""

    retries: int = 3
    base_s: float = 0.1
    max_s: float = 2.0

    def should_retry(self, err: Any, attempt: int, received: bool) -> bool:
        return not received and attempt < self.retries and err.code() == grpc.StatusCode.UNAVAILABLE

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.base_s * 2**attempt) * random.uniform(0.5, 1.0)


class Deadline:
    """One timeout over all attempts of a call, retries and backoff included."""

    def __init__(self, timeout: float | None):
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def credentials(secure: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if not secure and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)
