"""The main job: start the pools and both APIs for a config, serve until told to stop, then drain.

Runs the same way in the foreground (``splitserve serve``, a local Ray when no address is configured) and as a
Ray job (``ray job submit -- python -m splitserve serve CONFIG``): the job logs carry the listening addresses, and
``ray job stop`` sends SIGTERM, which drains and stops every actor.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from splitserve.config import SplitserveConfig

log = logging.getLogger("splitserve")
DEMO_PROMPT = "Disaggregated serving splits prefill from decode."


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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await cluster.start()
    servers = await serve(cluster, config, grpc_port=grpc_port, http_port=http_port)
    log.info("splitserve ready in %.1f s: %s", time.monotonic() - started, _pool_summary(config))
    try:
        if demo:
            await _demo(f"{servers.host}:{servers.grpc_port}", config.server.effective_auth_token)
        await stop.wait()
        log.info("stopping: draining in-flight requests (up to %.0f s); new requests get UNAVAILABLE", drain_timeout_s)
    finally:
        await cluster.shutdown(drain_timeout_s=drain_timeout_s)
        await servers.stop(grace=1.0)
        log.info("stopped")
    return 0


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
