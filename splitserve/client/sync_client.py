"""The blocking SDK over a plain grpc channel."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, Unpack, overload

import grpc

from splitserve.client.calls import ClientBase, Deadline, build_request, status_dict
from splitserve.client.types import GenerateOptions, GenerateResult, Health, ScaleResult, TokenEvent
from splitserve.server.gen import splitserve_pb2 as pb

_T = TypeVar("_T")


class Client(ClientBase):
    """``for event in client.generate("Hi", max_tokens=8)``; ``break`` or ``it.close()`` cancels the request."""

    _grpc = grpc

    @overload
    def generate(
        self,
        prompt: str | None = None,
        *,
        stream: Literal[True] = True,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[TokenEvent]: ...

    @overload
    def generate(
        self,
        prompt: str | None = None,
        *,
        stream: Literal[False],
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> GenerateResult: ...

    def generate(
        self,
        prompt: str | None = None,
        *,
        stream: bool = True,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[TokenEvent] | GenerateResult:
        request = build_request(prompt, options)
        deadline = Deadline(self.timeout if timeout is None else timeout)
        if stream:
            return self._stream(request, deadline)
        return GenerateResult.from_message(self._unary(self._sender(self._stub.GenerateUnary, request, deadline)))

    def _stream(self, request: pb.GenerateRequest, deadline: Deadline) -> Iterator[TokenEvent]:
        attempt = 0
        while True:
            call = self._stub.Generate(request, **self._call_args(deadline))
            received = False
            try:
                for message in call:
                    received = True
                    yield TokenEvent.from_message(message)
                return
            except grpc.RpcError as err:
                delay = self._backoff(err, attempt, received)
            finally:
                call.cancel()  # a no-op after the last message; otherwise the server aborts the request
            time.sleep(delay)
            attempt += 1

    def _unary(self, send: Callable[[], _T]) -> _T:
        attempt = 0
        while True:
            try:
                return send()
            except grpc.RpcError as err:
                delay = self._backoff(err, attempt, received=False)
            time.sleep(delay)
            attempt += 1

    def cancel(self, request_id: str) -> bool:
        """True when the request was running and is now aborted."""
        return self._unary(self._sender(self._stub.Cancel, pb.CancelRequest(request_id=request_id))).cancelled

    def health(self) -> Health:
        return Health.from_message(self._unary(self._sender(self._stub.Health, pb.HealthRequest())))

    def cluster_status(self) -> dict[str, Any]:
        return status_dict(self._unary(self._sender(self._stub.ClusterStatus, pb.ClusterStatusRequest())))

    def scale(self, role: str = "", replicas: int = 0, rebalance: bool = False) -> ScaleResult:
        """Resize the ``role`` pool to ``replicas`` workers, or (``rebalance=True``) move one worker to the busier
        phase if the router saw a sustained imbalance. Returns once new workers are ready / removed ones drained."""
        request = pb.ScaleRequest(role=role, replicas=replicas, rebalance=rebalance)
        return ScaleResult.from_message(self._unary(self._sender(self._stub.Scale, request)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
