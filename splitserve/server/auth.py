"""Bearer-token auth for both APIs, and the client identity the per-client limit is keyed on."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from splitserve.server.http_errors import error_response

# Health probes (load balancers, k8s) carry no token.
GRPC_OPEN_METHODS = ("/grpc.health.v1.Health/",)
HTTP_OPEN_PATHS = frozenset({"/health"})


def bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def authorized(header: str | None, expected: str | None) -> bool:
    if expected is None:
        return True
    token = bearer_token(header)
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())


def client_key(header: str | None, peer: str) -> str:
    """Clients with a token are one client wherever they connect from; others are their host."""
    token = bearer_token(header)
    if token is not None:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return "peer:" + peer


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, expected: str):
        self.expected = expected

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        metadata = dict(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        if (
            handler is None
            or method.startswith(GRPC_OPEN_METHODS)
            or authorized(metadata.get("authorization"), self.expected)
        ):
            return handler
        return _denied_like(handler)


async def _deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata authorization)")


def _denied_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler with the same streaming shape as ``handler`` that rejects the call."""
    shapes = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    # grpc.aio runs a plain coroutine for any shape (streaming handlers may write through the context instead).
    return shapes[(handler.request_streaming, handler.response_streaming)](_deny)  # type: ignore[operator]


def http_auth_middleware(expected: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.path in HTTP_OPEN_PATHS or authorized(request.headers.get("Authorization"), expected):
            return await handler(request)
        return error_response(
            401, "missing or wrong bearer token (header Authorization: Bearer TOKEN)", "unauthenticated"
        )

    return middleware
