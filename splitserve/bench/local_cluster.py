"""A cluster and its gRPC API started inside this process for one serving mode, so one script compares modes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from splitserve.bench.requests import WorkloadSpec
from splitserve.bench.sweep import SweepResult, run_sweep_apart
from splitserve.config import ServingMode, SplitserveConfig
from splitserve.netaddr import join_host_port
from splitserve.slo import SLO


def config_for(config: SplitserveConfig, mode: ServingMode) -> SplitserveConfig:
    """``config`` in ``mode`` on free ports, with the per-client limit raised to the cluster's own admission limit:
    the load generator is one client, and the benchmark measures the cluster, not the per-client cap."""
    server = config.server.model_copy(
        update={"grpc_port": 0, "http_port": 0, "max_concurrent_per_client": config.router.max_queue}
    )
    return config.model_copy(update={"mode": mode, "server": server})


@asynccontextmanager
async def local_cluster(config: SplitserveConfig, mode: ServingMode) -> AsyncIterator[str]:
    """Yield the gRPC address of a running cluster in ``mode``; every actor is stopped on exit."""
    from splitserve.cluster.controller import Cluster
    from splitserve.server.app import serve

    config = config_for(config, mode)
    cluster = Cluster(config)
    try:
        await cluster.start()
        servers = await serve(cluster, config)
        try:
            host = "127.0.0.1" if servers.host in ("0.0.0.0", "::", "") else servers.host
            yield join_host_port(host, servers.grpc_port)
        finally:
            await servers.stop(grace=1.0)
    finally:
        await cluster.shutdown()


async def sweep_local(
    config: SplitserveConfig,
    mode: ServingMode,
    spec: WorkloadSpec,
    rates: list[float | None],
    slo: SLO,
    warmup: int,
    timeout_s: float,
) -> SweepResult:
    """The rates swept, one after the other, on a cluster of ``config`` in ``mode`` started for them and stopped
    after; the load comes from a process of its own (``run_sweep_apart``)."""
    async with local_cluster(config, mode) as address:
        print(f"{mode.value}: serving on {address}; sweeping rates {rates}", flush=True)
        return await run_sweep_apart(address, spec, rates, slo, mode.value, warmup=warmup, timeout_s=timeout_s)
