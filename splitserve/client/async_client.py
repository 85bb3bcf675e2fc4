"""The asyncio SDK over grpc.aio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Literal, TypeVar, Unpack, overload

import grpc
from google.protobuf.json_format import MessageToDict

from splitserve.client.calls import ClientBase, Deadline, build_request
from splitserve.client.errors import from_rpc_error
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
                if not self.retry.should_retry(err, attempt, received):
                    raise from_rpc_error(err) from None
            finally:
                call.cancel()  # a no-op after the last message; otherwise the server aborts the request
            await asyncio.sleep(self.retry.delay(attempt))
            attempt += 1

    async def _result(self, request: pb.GenerateRequest, deadline: Deadline) -> GenerateResult:
        message = await self._unary(lambda: self._stub.GenerateUnary(request, **self._call_args(deadline)), deadline)
        return GenerateResult.from_message(message)

    async def _unary(self, send: Callable[[], Awaitable[_T]], deadline: Deadline) -> _T:
        attempt = 0
        while True:
            try:
                return await send()
            except grpc.RpcError as err:
                if not self.retry.should_retry(err, attempt, received=False):
                    raise from_rpc_error(err) from None
            await asyncio.sleep(self.retry.delay(attempt))
            attempt += 1

    async def cancel(self, request_id: str) -> bool:
        """True when the request was running and is now aborted."""
        deadline = Deadline(self.timeout)
        request = pb.CancelRequest(request_id=request_id)
        response = await self._unary(lambda: self._stub.Cancel(request, **self._call_args(deadline)), deadline)
        return response.cancelled

    async def health(self) -> Health:
        deadline = Deadline(self.timeout)
        response = await self._unary(
            lambda: self._stub.Health(pb.HealthRequest(), **self._call_args(deadline)), deadline
        )
        return Health(response.serving, response.model, response.max_model_len)

    async def cluster_status(self) -> dict[str, Any]:
        deadline = Deadline(self.timeout)
        response = await self._unary(
            lambda: self._stub.ClusterStatus(pb.ClusterStatusRequest(), **self._call_args(deadline)), deadline
        )
        return MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    async def scale(self, role: str = "", replicas: int = 0, rebalance: bool = False) -> ScaleResult:
        """Resize the ``role`` pool to ``replicas`` workers, or (``rebalance=True``) move one worker to the busier
        phase if the router saw a sustained imbalance. Returns once new workers are ready / removed ones drained."""
        deadline = Deadline(self.timeout)
        request = pb.ScaleRequest(role=role, replicas=replicas, rebalance=rebalance)
        response = await self._unary(lambda: self._stub.Scale(request, **self._call_args(deadline)), deadline)
        return ScaleResult.from_message(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
