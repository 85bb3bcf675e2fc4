"""The main job: start the pools and both APIs for a config, serve until told to stop, then drain.

Runs the same way in the foreground (``splitserve serve``, a local Ray when no address is configured) and as a
Ray job (``ray job submit -- python -m splitserve serve CONFIG``, or ``splitserve submit``): it joins the job's
cluster, the job logs carry the listening addresses, and ``ray job stop`` sends SIGTERM, which drains (in-flight
requests finish, new ones get UNAVAILABLE), stops every actor and closes both ports.

When the Ray cluster under the server goes away (its GCS stops answering, or this node is declared dead), the server
cannot serve again: it closes both APIs and exits with EXIT_RAY_GONE (3), so that its supervisor (systemd, Ray's job
manager, Kubernetes) restarts it, at most RAY_GONE_EXIT_BOUND_S (28 s) after Ray went away: the loss is detected
within splitserve.cluster.ray_watch.RAY_GONE_BOUND_S (18 s), and the process ends as soon as both ports are closed,
or RAY_GONE_EXIT_GRACE_S (10 s) later at the latest, however the shutdown went.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, NoReturn

from splitserve.cluster.ray_watch import RAY_GONE_BOUND_S
from splitserve.config import SplitserveConfig

if TYPE_CHECKING:
    from splitserve.cluster.controller import Cluster
    from splitserve.server.app import Servers

log = logging.getLogger("splitserve")
DEMO_PROMPT = "Disaggregated serving splits prefill from decode."
# In-flight gRPC calls left when the drain ends get this long before the server closes them.
STOP_GRACE_S = 1.0
EXIT_RAY_GONE = 3
# Once Ray is found gone: time to close the APIs before the process ends regardless (a Ray call blocked on the dead
# GCS, or Ray's own exit hook, must not keep the ports).
RAY_GONE_EXIT_GRACE_S = 10.0
RAY_GONE_EXIT_BOUND_S = RAY_GONE_BOUND_S + RAY_GONE_EXIT_GRACE_S


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
    loop = asyncio.get_running_loop()
    ray_gone = asyncio.Event()

    def on_ray_gone(reason: str) -> None:  # from the watch thread
        _exit_after(RAY_GONE_EXIT_GRACE_S)
        loop.call_soon_threadsafe(ray_gone.set)

    cluster = Cluster(config, on_ray_gone=on_ray_gone)
    servers: Servers | None = None
    try:
        await cluster.start()
        # After ray.init, which installs its own SIGTERM handler (an abrupt sys.exit): ours replaces it.
        stop = _stop_on_signals()
        servers = await serve(cluster, config, grpc_port=grpc_port, http_port=http_port)
        log.info("splitserve ready in %.1f s: %s", time.monotonic() - started, _pool_summary(config))
        if demo:
            await _demo(f"{servers.host}:{servers.grpc_port}", config.server.effective_auth_token)
        await _first_of(stop, ray_gone)
        if not ray_gone.is_set():
            log.info(
                "stopping: draining in-flight requests (up to %.0f s); new requests get UNAVAILABLE", drain_timeout_s
            )
    finally:
        if ray_gone.is_set():
            log.error("closing both APIs; exiting with code %d for a supervisor to restart the server", EXIT_RAY_GONE)
            await _close_without_ray(cluster, servers)
            _exit_now("both APIs are closed")
        await drain_and_stop(cluster, servers, drain_timeout_s)
    return 0


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _close_without_ray(cluster: Cluster, servers: Servers | None) -> None:
    """Ray is gone, and its workers with it: close the ports, make no Ray call (it could block on the dead GCS)."""
    cluster.abandon()
    if servers is not None:
        await servers.stop(grace=STOP_GRACE_S)


def _exit_now(why: str) -> NoReturn:
    """End the process with EXIT_RAY_GONE at once: neither asyncio's exit (it waits for executor threads, where a
    Ray call may be blocked on the dead GCS) nor Ray's exit hook may hold it up."""
    log.error("%s: exiting with code %d", why, EXIT_RAY_GONE)
    logging.shutdown()
    os._exit(EXIT_RAY_GONE)


def _exit_after(seconds: float) -> None:
    """End the process with EXIT_RAY_GONE in ``seconds`` if it has not ended by then."""
    timer = threading.Timer(seconds, _exit_now, args=(f"still running {seconds:.0f} s after Ray went away",))
    timer.daemon = True
    timer.start()


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
