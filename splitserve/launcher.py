"""The main job: start the pools and both APIs for a config, serve until told to stop, then drain.

Runs the same way in the foreground (``splitserve serve``, a local Ray when no address is configured) and as a
Ray job (``ray job submit -- python -m splitserve serve CONFIG``, or ``splitserve submit``): it joins the job's
cluster, the job logs carry the listening addresses, and ``ray job stop`` sends SIGTERM, which drains (in-flight
requests finish, new ones get UNAVAILABLE), stops every actor and closes both ports.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import TYPE_CHECKING

from splitserve.config import SplitserveConfig

if TYPE_CHECKING:
    from splitserve.cluster.controller import Cluster
    from splitserve.server.app import Servers

log = logging.getLogger("splitserve")
DEMO_PROMPT = "Disaggregated serving splits prefill from decode."
# In-flight gRPC calls left when the drain ends get this long before the server closes them.
STOP_GRACE_S = 1.0


async def run_server(
    config: SplitserveConfig,
    grpc_port: int | None = None,
    http_port: int | None = None,
    demo: bool = False,
    drain_timeout_s: float = 30.0,
) -> int:
    from splitserve.cluster.controller import Cluster
    from splitserve.server.app import serve

    started = time.monotonic()
    cluster = Cluster(config)
    servers: Servers | None = None
    try:
        await cluster.start()
        # After ray.init, which installs its own SIGTERM handler (an abrupt sys.exit): ours replaces it.
        stop = _stop_on_signals()
        servers = await serve(cluster, config, grpc_port=grpc_port, http_port=http_port)
        log.info("splitserve ready in %.1f s: %s", time.monotonic() - started, _pool_summary(config))
        if demo:
            await _demo(f"{servers.host}:{servers.grpc_port}", config.server.effective_auth_token)
        await stop.wait()
        log.info("stopping: draining in-flight requests (up to %.0f s); new requests get UNAVAILABLE", drain_timeout_s)
    finally:
        await drain_and_stop(cluster, servers, drain_timeout_s)
    return 0


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def drain_and_stop(cluster: Cluster, servers: Servers | None, drain_timeout_s: float) -> None:
    """The stop sequence: health probes see NOT_SERVING and the cluster rejects new requests (UNAVAILABLE) while
    in-flight ones keep streaming, for up to ``drain_timeout_s``; then every actor is killed and both ports close."""
    if servers is not None:
        await servers.begin_drain()
    await cluster.shutdown(drain_timeout_s=drain_timeout_s)
    if servers is not None:
        await servers.stop(grace=STOP_GRACE_S)
    log.info("stopped")


def _pool_summary(config: SplitserveConfig) -> str:
    if config.mode.value == "colocated":
        return f"colocated, {config.decode.replicas} workers"
    return f"{config.prefill.replicas} prefill + {config.decode.replicas} decode workers"


async def _demo(address: str, token: str | None) -> None:
    """One request through the public SDK, printed as it streams: proof the whole path works."""
    from splitserve.client import AsyncClient

    async with AsyncClient(address, token=token) as client:
        print(f"demo> {DEMO_PROMPT}", flush=True)
        last = None
        async for event in client.generate(DEMO_PROMPT, max_tokens=24):
            print(f"demo< token ids {list(event.token_ids)} text {event.text!r}", flush=True)
            last = event
        if last is not None and last.timing is not None:
            print(
                f"demo: finish={last.finish_reason} ttft={last.timing.ttft_ms:.1f} ms "
                f"tpot={last.timing.tpot_ms:.1f} ms kv_transfer={last.timing.kv_transfer_ms:.1f} ms "
                f"prefill={last.timing.prefill_worker} decode={last.timing.decode_worker}",
                flush=True,
            )
