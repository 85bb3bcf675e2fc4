"""Typed exceptions for gRPC status codes, so callers catch what they can act on (retry, fix input, re-auth)."""

from __future__ import annotations

from typing import Any

import grpc


class SplitserveError(Exception):
    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidArgument(SplitserveError):
    """The request is bad (the message names the field): fix it, do not retry."""


class ResourceExhausted(SplitserveError):
    """The cluster or this client's concurrency limit is full: retry later."""


class Unavailable(SplitserveError):
    """No healthy worker, or the server is draining: retry later (the client already retried)."""


class Unauthenticated(SplitserveError):
    """Missing or wrong bearer token."""


class Cancelled(SplitserveError):
    """The request was cancelled (by Cancel, or by the client)."""


class DeadlineExceeded(SplitserveError):
    """The client's timeout ran out."""


class ServerError(SplitserveError):
    """Anything else: an internal error of the server."""


_BY_STATUS: dict[grpc.StatusCode, type[SplitserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(err: Any) -> SplitserveError:
    """``err`` is a grpc.RpcError that is also a grpc.Call (what both sync and aio calls raise)."""
    code = err.code()
    return _BY_STATUS.get(code, ServerError)(err.details() or str(code), code)
