"""The decode worker's side: one receiver per KV cache, reachable by every backend it offers at once."""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import Future

import torch

from splitserve.kv_transfer import local
from splitserve.kv_transfer.base import PageSink, ReceiverEndpoint, TransferResult, TransferSpec
from splitserve.kv_transfer.errors import PeerUnavailable
from splitserve.kv_transfer.expectations import ExpectationTable
from splitserve.kv_transfer.grpc_server import OutOfBand, TransferServer
from splitserve.kv_transfer.peer import this_process

log = logging.getLogger(__name__)

_HEADROOM = 1 << 20  # message size above chunk_bytes, for headers


class KVReceiver:
    """The ``Receiver`` (base.py documents its methods): holds the expectation table; ``backends`` says which ways
    in are opened.

    ``local`` registers the table in this process; every other backend needs the gRPC server (the data path of
    grpc, the control path of cuda_ipc and nccl). The out-of-band backends contribute their hooks and endpoint
    fields (``out_of_band``, ``extra``) built by ``factory.make_receiver``.
    """

    def __init__(
        self,
        sink: PageSink | None,
        *,
        backends: tuple[str, ...],
        device: torch.device,
        chunk_bytes: int = 4 << 20,
        timeout_s: float = 30.0,
        host: str = "127.0.0.1",
        port: int = 0,
        out_of_band: dict[str, OutOfBand] | None = None,
        extra: dict | None = None,
    ):
        self.receiver_id = uuid.uuid4().hex
        self._table = ExpectationTable(sink)
        self._out_of_band = out_of_band or {}
        self._server: TransferServer | None = None
        if "local" in backends:
            local.register(self.receiver_id, self._table)
        address = None
        if set(backends) - {"local"}:
            self._server = TransferServer(
                self._table,
                host=host,
                port=port,
                max_message=chunk_bytes + _HEADROOM,
                timeout_s=timeout_s,
                out_of_band=self._out_of_band,
                pin_memory=device.type == "cuda",
            )
            address = self._server.address
        me = this_process(device)
        self.endpoint = ReceiverEndpoint(
            receiver_id=self.receiver_id,
            hostname=me.hostname,
            pid=me.pid,
            device=me.device,
            address=address,
            gpu_uuid=me.gpu_uuid,
            backends=tuple(backends),
            **(extra or {}),
        )

    @property
    def address(self) -> str | None:
        return self.endpoint.address

    def expect(self, spec: TransferSpec, sink: PageSink | None = None) -> Future[TransferResult]:
        return self._table.expect([spec], sink).future

    def expect_links(self, specs: list[TransferSpec], sink: PageSink | None = None) -> Future[TransferResult]:
        return self._table.expect(specs, sink).future

    def abort(self, request_id: str, reason: str = "aborted by the receiver") -> bool:
        return self._table.abort(request_id, reason)

    def unwritten(self, request_id: str) -> Future[None]:
        return self._table.unwritten(request_id)

    @property
    def pending(self) -> int:
        return self._table.pending

    def close(self) -> None:
        local.unregister(self.receiver_id)
        if self._server is not None:
            self._server.stop()
            self._server = None
        for path in self._out_of_band.values():
            path.shutdown()
        self._table.fail_all(PeerUnavailable("the receiver closed"))
