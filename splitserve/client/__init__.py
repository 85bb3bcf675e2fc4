"""The splitserve Python SDK: ``Client`` (blocking) and ``AsyncClient`` over the gRPC API."""

from splitserve.client.async_client import AsyncClient
from splitserve.client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServerError,
    SplitserveError,
    Unauthenticated,
    Unavailable,
)
from splitserve.client.sync_client import Client
from splitserve.client.types import GenerateResult, Health, ScaleResult, Timing, TokenEvent, Usage

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "GenerateResult",
    "Health",
    "InvalidArgument",
    "ResourceExhausted",
    "ScaleResult",
    "ServerError",
    "SplitserveError",
    "Timing",
    "TokenEvent",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
