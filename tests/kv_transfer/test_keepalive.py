"""The KV control channel's keepalive is accepted by its own server: an idle session stays connected."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
import pytest

from splitserve.kv_transfer import grpc_server, wire
from splitserve.kv_transfer.expectations import ExpectationTable

# Past the server's default ping strikes (2): a policy that refused the pings answers GOAWAY by the third.
IDLE_PINGS = 6


@pytest.mark.slow
@pytest.mark.parametrize("keepalive_ms", [1000, 1500])
def test_an_idle_session_survives_its_keepalive_pings(monkeypatch, keepalive_ms):
    """A sender's session held open and silent, as between transfers: the channel pings every ``keepalive_ms``
    and must stay READY with the call still open (a GOAWAY ``too_many_pings`` ends the call UNAVAILABLE)."""
    options = grpc_server.channel_options(1 << 20, keepalive_ms)
    monkeypatch.setattr(grpc_server, "channel_options", lambda max_message: options)
    server = grpc_server.TransferServer(
        ExpectationTable(None),
        host="127.0.0.1",
        port=0,
        max_message=1 << 20,
        timeout_s=5.0,
        out_of_band={},
        pin_memory=False,
    )
    channel = grpc.insecure_channel(server.address, options=options)
    states: list[grpc.ChannelConnectivity] = []
    outbound: queue.Queue[bytes | None] = queue.Queue()

    def messages() -> Iterator[bytes]:
        while (item := outbound.get()) is not None:
            yield item

    try:
        channel.subscribe(states.append, try_to_connect=True)
        grpc.channel_ready_future(channel).result(timeout=30)
        session = channel.stream_stream(
            wire.METHOD, request_serializer=wire.identity, response_deserializer=wire.identity
        )(messages())
        threading.Event().wait(IDLE_PINGS * keepalive_ms / 1000)
        assert not session.done(), f"the idle session was closed: {session.code()} {session.details()}"
        assert states[-1] == grpc.ChannelConnectivity.READY, f"the channel left READY: {states}"
        outbound.put(None)
        assert list(session) == []  # the session ends cleanly when the sender closes it
    finally:
        channel.close()
        server.stop()
