"""Health and restart: a loop polls every worker's stats, routes around a stalled one and replaces a dead one; a
watch thread checks that the Ray cluster itself is still there; ``unavailable_reason`` says why no request can be
served, while none can (the APIs refuse with it, and their health answers carry it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ray.exceptions import RayActorError

from splitserve.cluster.messages import WorkerStats
from splitserve.cluster.pools import Pools, WorkerHandle
from splitserve.cluster.ray_watch import RayWatch
from splitserve.config import RouterPolicy, ServingMode
from splitserve.roles import Role

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 10.0


class Health:
    def __init__(self, pools: Pools, on_ray_gone: Callable[[str], None] | None = None):
        self.pools = pools
        self.ray_gone: str | None = None  # why the Ray cluster is gone, once it is
        self._on_ray_gone = on_ray_gone
        self._task: asyncio.Task | None = None
        self._watch: RayWatch | None = None
        self._background: set[asyncio.Task] = set()
        pools.on_channel_broken = self.replace

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())
        self._watch = RayWatch(self._lost_ray)
        self._watch.start()

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await asyncio.gather(*(self.check(w) for w in self.pools.ready_workers()))
            self.pools.router.sample_balance()

    async def check(self, worker: WorkerHandle) -> None:
        dead = False
        try:
            stats: WorkerStats = await asyncio.wait_for(worker.actor.stats.remote(), HEALTH_TIMEOUT_S)
            worker.stats = stats
            ok = stats.extra.get("engine_failed", 0.0) == 0.0
            dead = not ok  # an engine whose step raised does not recover: replace the worker
        except RayActorError:
            ok, dead = False, True
        except TimeoutError:
            ok = False  # stalled (paused, swamped): route around it until it answers again; a stall is no death
        except Exception:
            log.exception("health check of %s", worker.worker_id)
            ok = False
        if ok != worker.healthy:
            log.warning("%s is %s", worker.worker_id, "healthy again" if ok else "unhealthy")
        worker.healthy = ok
        self.pools.router.set_healthy(worker.worker_id, ok)
        if dead:
            await self.restart(worker)

    def replace(self, worker: WorkerHandle) -> None:
        """A decode worker's token channel broke while the worker was listed: it cannot stream, so replace it."""
        self._background.add(task := asyncio.create_task(self.restart(worker)))
        task.add_done_callback(self._background.discard)

    async def restart(self, worker: WorkerHandle) -> None:
        busy = self.pools.restarting | self.pools.retiring
        if self.pools.draining or worker.worker_id in busy or self.pools.workers.get(worker.worker_id) is not worker:
            return  # stopping, already being replaced (by the health loop or a concurrent check), or retired
        self.pools.restarting.add(worker.worker_id)
        try:
            self.pools.router.remove_worker(worker.worker_id)
            worker.close_channel()
            await asyncio.to_thread(worker.kill)  # off the loop, as the respawn: the GCS may be what failed
            fresh = await self.pools.respawn(worker.role, worker.index)
            fresh.restarts = worker.restarts + 1
            try:
                await self.pools.register(fresh)
            except Exception as err:  # it stays listed, unhealthy and unrouted, for the operator to see (status)
                fresh.healthy = False
                fresh.problem = f"its restart failed: {err}"
                log.exception("%s failed to restart", fresh.worker_id)
                return
            log.info("%s restarted (restart %d)", fresh.worker_id, fresh.restarts)
        finally:
            self.pools.restarting.discard(worker.worker_id)

    async def refresh_stats(self) -> list[WorkerStats]:
        await asyncio.gather(*(self.check(w) for w in self.pools.ready_workers()))
        return [w.stats for w in self.pools.workers.values() if w.stats]

    def _lost_ray(self, reason: str) -> None:
        """From the watch thread: refuse every request from now on, then tell the owner."""
        self.ray_gone = reason
        log.error("the Ray cluster is gone: %s", reason)
        if self._on_ray_gone is not None:
            self._on_ray_gone(reason)

    def unavailable_reason(self) -> str | None:
        """Why no request can be served now, or None when one can: a decode-capable worker (decode or hybrid pool)
        and, split, a prefill-capable one (prefill or hybrid pool, or a decode worker under ``borrow_idle``)
        must be registered, healthy, and neither restarting nor retiring."""
        if self.ray_gone is not None:
            return f"the Ray cluster is gone ({self.ray_gone}); the server exits for its supervisor to restart it"
        if self.pools.draining:
            return "the cluster is shutting down; retry on another replica"
        serving = {w.role for w in self.pools.ready_workers() if w.healthy}
        needed = [("decode", {Role.DECODE, Role.HYBRID})]
        if (
            self.pools.config.mode == ServingMode.disaggregated
            and self.pools.config.router.policy != RouterPolicy.borrow_idle
        ):
            needed.append(("prefill", {Role.PREFILL, Role.HYBRID}))
        for phase, roles in needed:
            if not serving & roles:
                states = "; ".join(
                    f"{w.worker_id}: {self._why_down(w)}" for w in self.pools.workers.values() if w.role in roles
                )
                return f"no worker can run the {phase} phase ({states or 'none is running'}); retry later"
        return None

    def _why_down(self, worker: WorkerHandle) -> str:
        if worker.problem is not None:
            return worker.problem
        if worker.worker_id in self.pools.restarting:
            return "restarting"
        if worker.worker_id in self.pools.retiring:
            return "retiring"
        return "starting" if not worker.info else "failing its health checks"
