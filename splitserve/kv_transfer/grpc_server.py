"""The receiver's gRPC server: lands grpc payloads, and is the control channel of the out-of-band backends.

Each sender holds one call (a session) and runs all its transfers to us on it (``wire.py``). The server runs
grpc.aio on its own event-loop thread: a session's handler routes each message to its transfer's queue, and each
transfer is a task of its own that can wait for "next message", "the receiver aborted" and "the sender went silent"
at once, and answer the sender (READY, STOP, RESULT or ERROR) in each case.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np
import torch

from splitserve import handoff_trace
from splitserve.kv_transfer import codec, wire
from splitserve.kv_transfer.base import TransferSpec
from splitserve.kv_transfer.errors import (
    IntegrityError,
    PeerUnavailable,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from splitserve.kv_transfer.expectations import Expectation, ExpectationTable
from splitserve.kv_transfer.status import code_for
from splitserve.netaddr import join_host_port

log = logging.getLogger(__name__)
T = TypeVar("T")


class AbortMode(enum.Enum):
    """What a receiver abort does to a transfer under way; each backend's bytes need their own answer."""

    CUT = "cut"  # answer ABORTED at once: every byte lands through this server, which drops what comes after
    STOP = "stop"  # the sender writes into our pages itself (cuda_ipc): tell it to stop, and hold the pages until
    # it says it has (its ABORT), so nothing is written into pages handed to another request
    DRAIN = "drain"  # every announced layer must still be consumed (NCCL: an unmatched send hangs the pair), so
    # answer at the sender's END


class OutOfBand:
    """How a backend that moves bytes outside gRPC takes part in a transfer."""

    on_receiver_abort = AbortMode.CUT
    hooks_block = True  # open/close wait on I/O or a device, so they run in a worker thread; a backend whose hooks
    # only count (cuda_ipc) runs them on the event loop and saves the thread hop on the END -> RESULT path

    async def run(self, hook: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(hook, *args) if self.hooks_block else hook(*args)

    def open(self, spec: TransferSpec, begin: dict) -> object:
        """At BEGIN, before the expectation is claimed, so it runs for a transfer about to be refused too."""
        return None

    def close(self, exp: Expectation, opened: object, end: dict) -> None:
        """At END, before the transfer completes: land or count what the sender moved."""

    def discard(self, opened: object) -> None:
        """The transfer is over, whether or not ``close`` ran: forget what ``open`` set up."""

    def shutdown(self) -> None:
        """The receiver closes: stop taking anything in."""


KEEPALIVE_MS = 10_000


def channel_options(max_message: int, keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, int]]:
    """Both ends: messages up to a chunk plus headers, and keepalives so a dead peer is noticed on a quiet link.

    The server's ping policy must accept the client's keepalive, or it answers GOAWAY ``too_many_pings`` and drops
    the connection: a ping closer than ``min_ping_interval_without_data_ms`` to the last one is a strike. Strikes
    are not counted (``max_ping_strikes`` 0): both ends are ours, and on an idle link they never reset, so a busy
    host's late timers would add up to a GOAWAY over hours.
    """
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", max(keepalive_ms // 2, 1)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


class _LayerAssembler:
    """Collects one layer's chunks (in order, on one stream) into a buffer and decodes it when complete."""

    def __init__(self, spec: TransferSpec, codec_name: str, pin: bool):
        self.spec = spec
        self.codec = codec_name
        self.pin = pin
        self.layer_size = codec.encoded_size(codec_name, spec.torch_dtype, spec.layer_shape)
        self.layer = -1
        self.filled = 0
        self.buf = torch.empty(0, dtype=torch.uint8)

    def add(self, header: dict, payload: memoryview) -> torch.Tensor | None:
        """Returns the layer's pages once its last chunk is in."""
        layer, offset, total = header["layer"], header["offset"], header["total"]
        if total != self.layer_size:
            raise IntegrityError(f"layer {layer}: {total} bytes announced, {self.layer_size} expected")
        if offset == 0:
            self.layer, self.filled = layer, 0
            self.buf = torch.empty(total, dtype=torch.uint8, pin_memory=self.pin)
        if layer != self.layer or offset != self.filled or offset + len(payload) > total:
            raise IntegrityError(f"layer {layer}: chunk at {offset} out of order")
        self.buf.numpy()[offset : offset + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        self.filled += len(payload)
        if self.filled < total:
            return None
        return codec.decode(self.buf, self.codec, self.spec.torch_dtype, self.spec.layer_shape)


_SESSION_OVER = None  # queued to each transfer still open when its session ends


class _Inbound:
    """One transfer's messages, as its session's handler routes them here. A read that a wait gave up on stays
    pending for the next wait, so no message is lost to a timeout."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[wire.Message | None] = asyncio.Queue()
        self._read: asyncio.Future | None = None

    async def next(self, timeout_s: float, abort_wait: asyncio.Future | None = None) -> wire.Message:
        """The next message; TransferAborted if the receiver aborts first, TransferTimeout if the sender is silent."""
        if self._read is None:
            self._read = asyncio.ensure_future(self.queue.get())
        waits = {self._read} if abort_wait is None else {self._read, abort_wait}
        done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if self._read in done:
            read, self._read = self._read, None
            msg = read.result()
            if msg is _SESSION_OVER:
                raise PeerUnavailable("the sender's session ended without end or abort")
            return msg
        if abort_wait is not None and abort_wait in done:
            raise TransferAborted("aborted by the receiver")
        raise TransferTimeout(f"the sender sent nothing for {timeout_s:g} s")

    def close(self) -> None:
        if self._read is not None:
            self._read.cancel()


Reply = Callable[[dict], Awaitable[None]]  # answers one transfer: the header, tagged with its number on the way out


class _Answers:
    """A session's answers to its sender, one write at a time (a call takes no concurrent writes)."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._lock = asyncio.Lock()

    def to(self, tid: int) -> Reply:
        async def reply(header: dict) -> None:
            async with self._lock:
                await self._context.write(wire.pack({**header, "t": tid}))

        return reply


def _forget(inbound: dict[int, _Inbound], tasks: set[asyncio.Task], tid: int, task: asyncio.Task) -> None:
    """A transfer's task is over: later messages for it are dropped."""
    inbound.pop(tid, None)
    tasks.discard(task)


class TransferServer:
    def __init__(
        self,
        table: ExpectationTable,
        *,
        host: str,
        port: int,
        max_message: int,
        timeout_s: float,
        out_of_band: dict[str, OutOfBand],
        pin_memory: bool,
    ):
        self._table = table
        self._timeout_s = timeout_s
        self._out_of_band = out_of_band
        self._pin = pin_memory
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kv-transfer-server", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(host, port, max_message), self._loop).result()
        self.address = join_host_port(host, self.port)

    async def _start(self, host: str, port: int, max_message: int) -> int:
        self._server = grpc.aio.server(options=channel_options(max_message))
        handler = grpc.stream_stream_rpc_method_handler(
            self._session, request_deserializer=wire.identity, response_serializer=wire.identity
        )
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(wire.SERVICE, {"Transfer": handler})]
        )
        bound = self._server.add_insecure_port(join_host_port(host, port))
        if bound == 0:
            raise OSError(f"kv_transfer: cannot listen on {host}:{port}")
        await self._server.start()
        return bound

    def stop(self, grace: float | None = None) -> None:
        """Stop serving: in-flight senders see UNAVAILABLE/CANCELLED at once (PeerUnavailable)."""
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result()
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _session(self, requests, context: grpc.aio.ServicerContext) -> None:
        """One sender's session: every message to its transfer's task; BEGIN starts one. When the sender goes (or
        closes the session), the transfers still open fail with PeerUnavailable."""
        inbound: dict[int, _Inbound] = {}
        tasks: set[asyncio.Task] = set()
        answers = _Answers(context)
        try:
            async for data in requests:
                msg = wire.unpack(data)
                tid = msg.header.get("t")
                if not isinstance(tid, int):
                    await context.abort(grpc.StatusCode.DATA_LOSS, f"a {msg.kind!r} message without a transfer number")
                    return
                if msg.kind == wire.BEGIN and tid not in inbound:
                    inbound[tid] = _Inbound()
                    task = asyncio.create_task(self._transfer(msg, inbound[tid], answers.to(tid)))
                    tasks.add(task)
                    task.add_done_callback(functools.partial(_forget, inbound, tasks, tid))
                elif tid in inbound:
                    inbound[tid].queue.put_nowait(msg)
                # else: a message for a transfer that is over here (refused, failed): nothing waits for it
        except asyncio.CancelledError:
            for task in tasks:  # the call is gone: nothing can be answered, fail each transfer now
                task.cancel()
            raise
        finally:
            for transfer in inbound.values():
                transfer.queue.put_nowait(_SESSION_OVER)
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _transfer(self, begin: wire.Message, inbound: _Inbound, reply: Reply) -> None:
        aborted = asyncio.Event()
        abort_wait = asyncio.ensure_future(aborted.wait())
        exp: Expectation | None = None
        path: OutOfBand | None = None
        opened: object = None
        holding = False  # the pages are held for a sender that writes them itself
        try:
            spec = TransferSpec.from_wire(begin.header["spec"])
            handoff_trace.mark("receiver.begin", spec.request_id)
            path = self._out_of_band.get(begin.header["transport"])
            mode = AbortMode.CUT if path is None else path.on_receiver_abort
            opened = None if path is None else await path.run(path.open, spec, begin.header)
            exp = self._table.claim(spec)
            handoff_trace.mark("receiver.claimed", spec.request_id)
            holding = mode is AbortMode.STOP
            if holding:
                exp.hold_pages()
            if mode is not AbortMode.DRAIN:
                loop = asyncio.get_running_loop()

                def wake(_reason: str) -> None:
                    loop.call_soon_threadsafe(aborted.set)

                exp.on_abort(wake)
                if exp.done:  # aborted between claim and on_abort: the sender has written nothing, and will not
                    raise TransferAborted(f"{spec.request_id}: aborted by the receiver")
            await reply({"kind": wire.READY})
            try:
                result = await self._receive(exp, begin.header, inbound, abort_wait, path, opened)
            except TransferAborted:
                if mode is AbortMode.STOP and aborted.is_set():
                    await self._stop_sender(reply, inbound)
                raise
            if holding:  # END or ABORT came after the sender's last write: free before the sender is answered
                holding = False
                exp.release_pages()
            await reply({"kind": wire.RESULT, **result})
        except Exception as err:
            if not isinstance(err, TransferError):  # a bug, or a BEGIN we cannot read: the sender must still hear
                log.exception("kv_transfer: a transfer failed")
                err = TransferError(f"the receiver failed: {err!r}")
            if exp is not None and not isinstance(err, TransferAborted):
                exp.fail(err)
            await reply({"kind": wire.ERROR, "code": code_for(err).name, "details": str(err)})
        finally:
            abort_wait.cancel()
            inbound.close()
            if path is not None:
                path.discard(opened)
            if exp is not None:  # no-op once done; else the sender vanished (session gone) mid-transfer
                exp.fail(PeerUnavailable(f"{exp.spec.request_id}: the sender went away mid-transfer"))
                if holding:  # it stopped (ABORT or END), went away, or stayed silent past the timeout
                    exp.release_pages()

    async def _stop_sender(self, reply: Reply, inbound: _Inbound) -> None:
        """Tell a sender that writes into our pages to stop, and wait until it says it has (ABORT or END)."""
        await reply({"kind": wire.STOP})
        deadline = time.monotonic() + self._timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await inbound.next(left)
            except TransferError:  # gone, or silent past the timeout: the last resort
                return
            if msg.kind in (wire.ABORT, wire.END):
                return

    async def _receive(
        self,
        exp: Expectation,
        begin: dict,
        inbound: _Inbound,
        abort_wait: asyncio.Future,
        path: OutOfBand | None,
        opened: object,
    ) -> dict:
        transport = begin["transport"]
        checksum = 0
        assembler = _LayerAssembler(exp.spec, begin.get("codec", "none"), self._pin)
        while True:
            msg = await inbound.next(self._timeout_s, abort_wait)
            if msg.kind == wire.CHUNK:
                if begin.get("checksum"):
                    checksum = codec.crc32(msg.payload, checksum)
                pages = assembler.add(msg.header, msg.payload)
                if pages is not None:
                    exp.land_layer(msg.header["layer"], pages, assembler.layer_size)
            elif msg.kind == wire.END:
                handoff_trace.mark("receiver.end", exp.spec.request_id)
                if path is not None:
                    await path.run(path.close, exp, opened, msg.header)
                if exp.done:  # aborted while draining: report that abort
                    exp.future.result()
                if begin.get("checksum") and transport == "grpc" and msg.header["checksum"] != checksum:
                    raise IntegrityError(f"{exp.spec.request_id}: checksum mismatch")
                handoff_trace.mark("receiver.completed", exp.spec.request_id)
                result = exp.complete(transport)
                return {"ok": True, "bytes": result.bytes}
            elif msg.kind == wire.ABORT:
                reason = msg.header.get("reason", "aborted by the sender")
                exp.fail(TransferAborted(f"{exp.spec.request_id}: {reason}"))
                return {"ok": False, "aborted": reason}
            else:
                raise IntegrityError(f"unknown message {msg.kind!r}")
