"""The asyncio SDK over grpc.aio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Literal, TypeVar, Unpack, overload

import grpc

from splitserve.client.calls import ClientBase, Deadline, build_request, status_dict
from splitserve.client.types import GenerateOptions, GenerateResult, Health, ScaleResult, TokenEvent
from splitserve.server.gen import splitserve_pb2 as pb

_T = TypeVar("_T")


class AsyncClient(ClientBase):
    """``async for event in client.generate("Hi", max_tokens=8)``; leaving the loop early cancels the request
    once the iterator is closed (``await it.aclose()``, or ``contextlib.aclosing``)."""

    _grpc = grpc.aio

    @overload
    def generate(
        self,
        prompt: str | None = None,
        *,
        stream: Literal[True] = True,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncGenerator[TokenEvent, None]: ...

    @overload
    def generate(
        self,
        prompt: str | None = None,
        *,
        stream: Literal[False],
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Awaitable[GenerateResult]: ...

    def generate(
        self,
        prompt: str | None = None,
        *,
        stream: bool = True,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncGenerator[TokenEvent, None] | Awaitable[GenerateResult]:
        request = build_request(prompt, options)
        deadline = Deadline(self.timeout if timeout is None else timeout)
        if stream:
            return self._stream(request, deadline)
        return self._result(request, deadline)

    async def _stream(self, request: pb.GenerateRequest, deadline: Deadline) -> AsyncGenerator[TokenEvent, None]:
        attempt = 0
        while True:
            call = self._stub.Generate(request, **self._call_args(deadline))
            received = False
            try:
                async for message in call:
                    received = True
                    yield TokenEvent.from_message(message)
                return
            except grpc.RpcError as err:
                delay = self._backoff(err, attempt, received)
            finally:
                call.cancel()  # a no-op after the last message; otherwise the server aborts the request
            await asyncio.sleep(delay)
            attempt += 1

    async def _result(self, request: pb.GenerateRequest, deadline: Deadline) -> GenerateResult:
        return GenerateResult.from_message(await self._unary(self._sender(self._stub.GenerateUnary, request, deadline)))

    async def _unary(self, send: Callable[[], Awaitable[_T]]) -> _T:
        attempt = 0
        while True:
            try:
                return await send()
            except grpc.RpcError as err:
                delay = self._backoff(err, attempt, received=False)
            await asyncio.sleep(delay)
            attempt += 1

    async def cancel(self, request_id: str) -> bool:
        """True when the request was running and is now aborted."""
        response = await self._unary(self._sender(self._stub.Cancel, pb.CancelRequest(request_id=request_id)))
        return response.cancelled

    async def health(self) -> Health:
        return Health.from_message(await self._unary(self._sender(self._stub.Health, pb.HealthRequest())))

    async def cluster_status(self) -> dict[str, Any]:
        return status_dict(await self._unary(self._sender(self._stub.ClusterStatus, pb.ClusterStatusRequest())))

    async def scale(self, role: str = "", replicas: int = 0, rebalance: bool = False) -> ScaleResult:
        """Resize the ``role`` pool to ``replicas`` workers, or (``rebalance=True``) move one worker to the busier
        phase if the router saw a sustained imbalance. Returns once new workers are ready / removed ones drained."""
        request = pb.ScaleRequest(role=role, replicas=replicas, rebalance=rebalance)
        return ScaleResult.from_message(await self._unary(self._sender(self._stub.Scale, request)))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
