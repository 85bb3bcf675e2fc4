"""The local backend: sender and receiver in one process, pages copied straight into the sink."""

from __future__ import annotations

import threading
import weakref

import torch

from splitserve.kv_transfer.base import ReceiverEndpoint, TransferSpec
from splitserve.kv_transfer.errors import PeerUnavailable, TransferAborted, TransferError
from splitserve.kv_transfer.expectations import Expectation, ExpectationTable

_registry: weakref.WeakValueDictionary[str, ExpectationTable] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def register(receiver_id: str, table: ExpectationTable) -> None:
    with _lock:
        _registry[receiver_id] = table


def unregister(receiver_id: str) -> None:
    with _lock:
        _registry.pop(receiver_id, None)


def lookup(receiver_id: str) -> ExpectationTable | None:
    with _lock:
        return _registry.get(receiver_id)


class LocalHandle:
    """Synchronous: send_layer has written the pages when it returns. Errors wait for finish(), like every backend."""

    def __init__(self, exp: Expectation | None, error: TransferError | None):
        self._exp = exp
        self._error = error

    def send_layer(self, layer: int, pages: torch.Tensor) -> None:
        if self._exp is None or self._error is not None:
            return
        try:
            self._exp.land_layer(layer, pages, pages.numel() * pages.element_size())
        except TransferError as err:
            self._error = err
            self._exp.fail(err)

    def finish(self) -> int:
        if self._error is not None:
            raise self._error
        assert self._exp is not None
        if self._exp.done:  # the receiver aborted
            self._exp.future.result()
        return self._exp.complete("local").bytes

    def abort(self, reason: str) -> None:
        self._error = self._error or TransferAborted(f"aborted by the sender ({reason})")
        if self._exp is not None:
            self._exp.fail(TransferAborted(f"{self._exp.spec.request_id}: {reason}"))


class LocalSender:
    backend = "local"

    def __init__(self, endpoint: ReceiverEndpoint):
        self._receiver_id = endpoint.receiver_id

    def begin(self, spec: TransferSpec) -> LocalHandle:
        table = lookup(self._receiver_id)
        if table is None:
            return LocalHandle(None, PeerUnavailable(f"receiver {self._receiver_id} is not in this process"))
        try:
            return LocalHandle(table.claim(spec), None)
        except TransferError as err:
            return LocalHandle(None, err)

    def close(self) -> None:
        pass
