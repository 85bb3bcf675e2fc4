"""Starts the gRPC and HTTP APIs over one cluster and stops them cleanly."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.config import ServerConfig, SplitserveConfig
from splitserve.netaddr import join_host_port
from splitserve.server.auth import GrpcAuthInterceptor
from splitserve.server.frontend import Frontend, ServingCluster
from splitserve.server.gen import splitserve_pb2 as pb
from splitserve.server.gen import splitserve_pb2_grpc as pb_grpc
from splitserve.server.grpc_service import SplitserveService
from splitserve.server.http_api import create_app

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Splitserve"].full_name
# Room above max_request_bytes so an oversized request reaches validation and gets INVALID_ARGUMENT naming the limit.
_GRPC_RECEIVE_SLACK = 1 << 20
# How often the standard gRPC health service is brought in line with the cluster (the cluster's own health loop
# polls its workers each second).
HEALTH_SYNC_S = 1.0


@dataclass
class Servers:
    """Both running APIs; ``stop`` ends them (in-flight gRPC calls get ``grace`` seconds)."""

    host: str
    grpc_port: int
    http_port: int
    grpc_server: grpc.aio.Server
    http_runner: web.AppRunner
    health: health.aio.HealthServicer
    health_sync: asyncio.Task

    async def begin_drain(self) -> None:
        """Report NOT_SERVING to health probes so load balancers move away; calls in flight keep streaming."""
        self.health_sync.cancel()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float = 5.0) -> None:
        await self.begin_drain()
        await self.grpc_server.stop(grace)
        await self.http_runner.cleanup()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def _tls(server: ServerConfig) -> tuple[grpc.ServerCredentials | None, ssl.SSLContext | None]:
    if server.tls is None:
        return None, None
    with open(server.tls.cert_file, "rb") as cert, open(server.tls.key_file, "rb") as key:
        credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server.tls.cert_file, server.tls.key_file)
    return credentials, context


async def _start_grpc(
    frontend: Frontend, server: ServerConfig, port: int, credentials: grpc.ServerCredentials | None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    token = server.effective_auth_token
    grpc_server = grpc.aio.server(
        interceptors=[GrpcAuthInterceptor(token)] if token else [],
        options=[("grpc.max_receive_message_length", server.max_request_bytes + _GRPC_RECEIVE_SLACK)],
    )
    pb_grpc.add_SplitserveServicer_to_server(SplitserveService(frontend), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, grpc_server)
    address = join_host_port(server.host, port)
    if credentials is None:
        bound = grpc_server.add_insecure_port(address)
    else:
        bound = grpc_server.add_secure_port(address, credentials)
    await grpc_server.start()
    return grpc_server, health_servicer, bound


class _HealthSync:
    """Keeps the standard health service's answer equal to the cluster's: NOT_SERVING while no request can be
    served (the reason goes to the log and to splitserve.v1 Health), SERVING again once one can."""

    def __init__(self, cluster: ServingCluster, servicer: health.aio.HealthServicer):
        self._cluster = cluster
        self._servicer = servicer
        self._reported: str | None = "not yet reported"

    async def once(self) -> None:
        reason = self._cluster.unavailable_reason()
        if reason == self._reported:
            return
        answer = health_pb2.HealthCheckResponse
        for service in ("", SERVICE_NAME):
            await self._servicer.set(service, answer.SERVING if reason is None else answer.NOT_SERVING)
        if reason is not None:
            log.warning("not serving: %s", reason)
        self._reported = reason

    async def run(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_SYNC_S)
            await self.once()


async def _start_http(
    frontend: Frontend, server: ServerConfig, port: int, context: ssl.SSLContext | None
) -> tuple[web.AppRunner, int]:
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the request in the cluster.
    runner = web.AppRunner(create_app(frontend, server.effective_auth_token), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, server.host, port, ssl_context=context)
    await site.start()
    return runner, runner.addresses[0][1]


async def serve(
    cluster: ServingCluster,
    config: SplitserveConfig,
    grpc_port: int | None = None,
    http_port: int | None = None,
    ready: asyncio.Event | None = None,
) -> Servers:
    """Start both APIs on ``config.server.host`` (ports default to the config's; 0 picks a free one) and return."""
    server = config.server
    frontend = Frontend(cluster, server)
    credentials, ssl_context = _tls(server)
    grpc_server, health_servicer, bound_grpc = await _start_grpc(
        frontend, server, server.grpc_port if grpc_port is None else grpc_port, credentials
    )
    try:
        runner, bound_http = await _start_http(
            frontend, server, server.http_port if http_port is None else http_port, ssl_context
        )
    except BaseException:
        await grpc_server.stop(None)
        raise
    scheme = "https" if ssl_context else "http"
    log.info(
        "splitserve listening: grpc=%s http=%s://%s",
        join_host_port(server.host, bound_grpc),
        scheme,
        join_host_port(server.host, bound_http),
    )
    if ready is not None:
        ready.set()
    health_sync = _HealthSync(cluster, health_servicer)
    await health_sync.once()
    sync = asyncio.create_task(health_sync.run())
    return Servers(server.host, bound_grpc, bound_http, grpc_server, runner, health_servicer, sync)
