"""The blocking SDK over a plain grpc channel."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, Unpack, overload

import grpc
from google.protobuf.json_format import MessageToDict

from splitserve.client.calls import ClientBase, Deadline, build_request
from splitserve.client.errors import from_rpc_error
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
        message = self._unary(lambda: self._stub.GenerateUnary(request, **self._call_args(deadline)))
        return GenerateResult.from_message(message)

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
                if not self.retry.should_retry(err, attempt, received):
                    raise from_rpc_error(err) from None
            finally:
                call.cancel()  # a no-op after the last message; otherwise the server aborts the request
            time.sleep(self.retry.delay(attempt))
            attempt += 1

    def _unary(self, send: Callable[[], _T]) -> _T:
        attempt = 0
        while True:
            try:
                return send()
            except grpc.RpcError as err:
                if not self.retry.should_retry(err, attempt, received=False):
                    raise from_rpc_error(err) from None
            time.sleep(self.retry.delay(attempt))
            attempt += 1

    def cancel(self, request_id: str) -> bool:
        """True when the request was running and is now aborted."""
        deadline = Deadline(self.timeout)
        request = pb.CancelRequest(request_id=request_id)
        return self._unary(lambda: self._stub.Cancel(request, **self._call_args(deadline))).cancelled

    def health(self) -> Health:
        deadline = Deadline(self.timeout)
        response = self._unary(lambda: self._stub.Health(pb.HealthRequest(), **self._call_args(deadline)))
        return Health(response.serving, response.model, response.max_model_len)

    def cluster_status(self) -> dict[str, Any]:
        deadline = Deadline(self.timeout)
        response = self._unary(lambda: self._stub.ClusterStatus(pb.ClusterStatusRequest(), **self._call_args(deadline)))
        return MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    def scale(self, role: str = "", replicas: int = 0, rebalance: bool = False) -> ScaleResult:
        """Resize the ``role`` pool to ``replicas`` workers, or (``rebalance=True``) move one worker to the busier
        phase if the router saw a sustained imbalance. Returns once new workers are ready / removed ones drained."""
        deadline = Deadline(self.timeout)
        request = pb.ScaleRequest(role=role, replicas=replicas, rebalance=rebalance)
        return ScaleResult.from_message(self._unary(lambda: self._stub.Scale(request, **self._call_args(deadline))))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
