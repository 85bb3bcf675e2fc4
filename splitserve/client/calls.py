"""What the sync and async clients share: the channel and its settings, request building, the retry policy,
deadlines, channel credentials."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict

from splitserve.client.errors import from_rpc_error
from splitserve.client.types import GenerateOptions
from splitserve.server.gen import splitserve_pb2 as pb
from splitserve.server.gen import splitserve_pb2_grpc as pb_grpc

_T = TypeVar("_T")


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


def status_dict(message: pb.ClusterStatusResponse) -> dict[str, Any]:
    """ClusterStatus as plain data, every field present (zeros and empty lists included)."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def credentials(secure: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if not secure and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


class ClientBase:
    """The channel, its stub and the per-call settings; ``_grpc`` is the module whose channels a client opens
    (``grpc`` for the blocking client, ``grpc.aio`` for the asyncio one)."""

    _grpc: Any

    def __init__(
        self,
        address: str,
        token: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        secure: bool = False,
        root_certificates: bytes | None = None,
    ):
        creds = credentials(secure, root_certificates)
        opened = self._grpc.insecure_channel(address) if creds is None else self._grpc.secure_channel(address, creds)
        self._channel: Any = opened
        self._stub = pb_grpc.SplitserveStub(opened)
        self._metadata = metadata(token)
        self.timeout = timeout
        self.retry = RetryPolicy(retries)

    def _call_args(self, deadline: Deadline) -> dict[str, Any]:
        return {"timeout": deadline.remaining(), "metadata": self._metadata}

    def _sender(self, method: Callable[..., _T], request: Any, deadline: Deadline | None = None) -> Callable[[], _T]:
        """One attempt of a unary call of ``method``, with what is left of ``deadline`` (by default the client's
        timeout from now)."""
        within = Deadline(self.timeout) if deadline is None else deadline
        return lambda: method(request, **self._call_args(within))

    def _backoff(self, err: grpc.RpcError, attempt: int, received: bool) -> float:
        """Seconds to wait before the attempt after ``attempt`` failed with ``err``; raises the SDK's error instead
        where the policy retries no more."""
        if not self.retry.should_retry(err, attempt, received):
            raise from_rpc_error(err) from None
        return self.retry.delay(attempt)
