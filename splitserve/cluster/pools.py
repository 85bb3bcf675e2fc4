"""Lifecycle and scaling of the worker pools: spawn the Ray actors, register them with the router once ready, grow
or shrink a pool while serving (removed workers drain first: no new requests, running ones finish), and list each
worker's state. The set of workers and their bookkeeping live here; health and the request path read them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group

from splitserve.cluster.channel import WorkerChannel
from splitserve.cluster.messages import CacheEvents, ErrorCode, ServingError, WorkerStats
from splitserve.cluster.rank_group import bundle_options, rank_bundles
from splitserve.cluster.router import Move, Router
from splitserve.cluster.worker_options import options_for
from splitserve.config import Device, ServingMode, SplitserveConfig, _PoolConfig
from splitserve.roles import Role
from splitserve.worker_common import CONCURRENCY_GROUPS

log = logging.getLogger(__name__)

# A worker Ray cannot place (no free GPU of its type) fails startup or `scale` after this long.
READY_TIMEOUT_S = 600.0
SCALE_DRAIN_TIMEOUT_S = 120.0
RETIRE_POLL_S = 0.1


def _last_line(err: BaseException) -> str:
    """The line that names the cause: Ray's error text is the worker's whole traceback, ending with it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


@dataclass
class ScaleResult:
    role: Role
    before: int
    after: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        changes = [f"started {', '.join(self.added)}"] if self.added else []
        if self.removed:
            changes.append(f"drained and stopped {', '.join(self.removed)}")
        return f"{self.role}: {self.before} → {self.after} replicas ({'; '.join(changes) or 'no change'})"


@dataclass
class WorkerHandle:
    """One worker actor as the cluster sees it."""

    role: Role
    index: int  # the worker id's number within its pool: ids are never reused, so a restart keeps it
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    stats: WorkerStats | None = None
    healthy: bool = True
    problem: str | None = None  # why it cannot serve, while it cannot
    restarts: int = 0
    channel: WorkerChannel | None = None  # its news for the router (tokens, first tokens, transfers), once ready
    placement: Any = None  # a tensor-parallel worker's placement group: its ranks' GPUs (or CPU shares), one node

    @property
    def worker_id(self) -> str:
        return f"{self.role}-{self.index}"

    def stop(self) -> None:
        self.close_channel()
        self.kill()

    def close_channel(self) -> None:
        """Fail whoever still reads its channel. On the event loop."""
        if self.channel is not None:
            self.channel.close()

    def kill(self) -> None:
        """GCS calls: they block for as long as the GCS client retries an unreachable GCS. A tensor-parallel
        worker's followers die with it (it owns them) and with its placement group."""
        ray.kill(self.actor, no_restart=True)
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None  # removed once, however often the handle is killed


class Pools:
    def __init__(self, config: SplitserveConfig, model_dir: str, router: Router):
        self.config = config
        self.model_dir = model_dir
        self.router = router
        self.workers: dict[str, WorkerHandle] = {}
        self.draining = False  # set once the cluster stops: no new request, no scaling, no restart
        self.using: Counter[str] = Counter()  # attempts in flight per worker: what a retiring worker waits for
        self.spawned: Counter[Role] = Counter()  # per role, so a worker id is never reused by a scale-up
        self.restarting: set[str] = set()
        self.retiring: set[str] = set()
        self.scale_lock = asyncio.Lock()
        # A worker's channel broke while it was listed: it cannot report (set by the health side).
        self.on_channel_broken: Callable[[WorkerHandle], None] = lambda worker: None

    async def start(self) -> None:
        """Every pool at its configured size."""
        roles = [role for role in self.roles() for _ in range(self.pool(role).replicas)]
        await self.bring_up([self.spawn(role, self.next_index(role)) for role in roles])

    def stop_all(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()

    def _actor_options(self, pool: _PoolConfig, placement: Any) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "num_cpus": 0,
            "max_restarts": 0,
            "max_concurrency": 4096,
            "namespace": self.config.cluster.namespace,
        }
        if placement is not None:  # rank 0 of its group takes the first bundle; it starts the others in theirs
            return {**opts, **bundle_options(placement.bundle_specs[0], placement, 0)}
        if self.config.cluster.device != Device.cpu:
            opts["num_gpus"] = pool.gpus_per_replica
            if pool.gpu_type:
                opts["accelerator_type"] = pool.gpu_type
        return opts

    def roles(self) -> list[Role]:
        """The pools this cluster runs; hybrid workers are decode workers that also take prompt overflow."""
        split = [Role.PREFILL] if self.config.mode == ServingMode.disaggregated else []
        return [*split, Role.DECODE, Role.HYBRID]

    def pool(self, role: Role) -> _PoolConfig:
        pools: dict[Role, _PoolConfig] = {
            Role.PREFILL: self.config.prefill,
            Role.DECODE: self.config.decode,
            Role.HYBRID: self.config.hybrid,
        }
        return pools[role]

    def next_index(self, role: Role) -> int:
        index = self.spawned[role]
        self.spawned[role] += 1
        return index

    def spawn(self, role: Role, index: int) -> WorkerHandle:
        worker = WorkerHandle(role, index, actor=None)
        worker.actor = self._create_actor(worker)
        self.workers[worker.worker_id] = worker
        return worker

    async def respawn(self, role: Role, index: int) -> WorkerHandle:
        """``spawn`` with the actor's creation off the event loop: a restart runs when something went wrong, maybe
        the GCS itself, and while it is unreachable the creation blocks (the loop must keep answering requests)."""
        worker = WorkerHandle(role, index, actor=None)
        worker.actor = await asyncio.to_thread(self._create_actor, worker)
        self.workers[worker.worker_id] = worker
        return worker

    def _create_actor(self, worker: WorkerHandle) -> Any:
        """A GCS call (the actor's registration)."""
        from splitserve.decode_worker.worker import DecodeWorker
        from splitserve.prefill_worker.worker import PrefillWorker

        pool = self.pool(worker.role)
        cls = PrefillWorker if worker.role == Role.PREFILL else DecodeWorker
        options = options_for(self.config, pool, self.model_dir)
        if pool.tensor_parallel_size > 1:
            bundles = rank_bundles(pool, self.config.cluster.device)
            # Unnamed: Ray refuses a name still held by a group being removed, as a restart's would be.
            worker.placement = placement_group(bundles, strategy="STRICT_PACK")
        actor_cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(cls)  # type: ignore[call-overload]  # stubs lack it
        opts = self._actor_options(pool, worker.placement)
        return actor_cls.options(**opts).remote(worker.worker_id, options)

    async def bring_up(self, workers: list[WorkerHandle]) -> None:
        """Register each worker as soon as it is ready (one log line each); if any fails, stop them all."""
        started = time.monotonic()
        total = Counter(w.role for w in workers)
        ready: Counter[Role] = Counter()

        async def one(worker: WorkerHandle) -> None:
            await self.register(worker)
            ready[worker.role] += 1
            log.info(
                "%s ready (%d/%d %s) on %s in %.1f s (%d KV blocks)",
                worker.worker_id,
                ready[worker.role],
                total[worker.role],
                worker.role,
                worker.info.get("device"),
                time.monotonic() - started,
                worker.info.get("kv_blocks", 0),
            )

        results = await asyncio.gather(*(one(w) for w in workers), return_exceptions=True)
        failures = [err for err in results if isinstance(err, BaseException)]
        if failures:
            for worker in workers:
                self.forget(worker)
                worker.stop()
            raise failures[0]

    async def register(self, worker: WorkerHandle) -> WorkerHandle:
        pool = self.pool(worker.role)
        try:
            worker.info = await asyncio.wait_for(worker.actor.ready.remote(), READY_TIMEOUT_S)
        except TimeoutError:
            raise ServingError(
                ErrorCode.UNAVAILABLE,
                f"{worker.worker_id} was not placed in {READY_TIMEOUT_S:.0f} s: no free GPU fits "
                f"{worker.role}.gpus_per_replica={pool.gpus_per_replica} "
                f"tensor_parallel_size={pool.tensor_parallel_size} (on one node) gpu_type={pool.gpu_type!r} "
                "(see `ray status`; lower them or add nodes)",
            ) from None
        except RayActorError as err:
            failure = f"{worker.worker_id} failed to start: {_last_line(err)}"
            raise ServingError(ErrorCode.UNAVAILABLE, failure) from None
        block_size = worker.info["block_size"]
        # Registered before the channel opens: the index takes the worker's first cache events.
        if worker.role == Role.PREFILL:
            self.router.add_prefill_worker(worker.worker_id, pool.max_queue, block_size=block_size)
        else:
            capacity = worker.info["kv_blocks"] * block_size
            self.router.add_decode_worker(
                worker.worker_id, capacity, pool.max_queue, hybrid=worker.role == Role.HYBRID, block_size=block_size
            )
        worker.channel = WorkerChannel(
            worker.worker_id,
            worker.actor,
            on_broken=lambda: self.on_channel_broken(worker),
            on_cache_events=lambda events: self._cache_events(worker, events),
        )
        return worker

    def _cache_events(self, worker: WorkerHandle, events: CacheEvents) -> None:
        if self.workers.get(worker.worker_id) is worker:  # not a replaced worker's last words
            self.router.cache_events(worker.worker_id, events)

    def ready_workers(self) -> list[WorkerHandle]:
        busy = self.restarting | self.retiring
        return [w for w in self.workers.values() if w.info and w.worker_id not in busy]

    async def scale(self, role: str, replicas: int, drain_timeout_s: float = SCALE_DRAIN_TIMEOUT_S) -> ScaleResult:
        """Grow or shrink one pool while serving. Removed workers are the least busy; they drain before they stop."""
        pools = [r.value for r in self.roles()]
        if role not in pools:
            raise ServingError(
                ErrorCode.INVALID_ARGUMENT,
                f"role: {role!r} is not a pool of this {self.config.mode.value} cluster; use one of {pools}",
            )
        return await self._scale(Role(role), replicas, drain_timeout_s)

    async def _scale(self, role: Role, replicas: int, drain_timeout_s: float) -> ScaleResult:
        least = 0 if role == Role.HYBRID else 1  # the hybrid pool is optional; the others carry every request
        if replicas < least:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"replicas: the {role} pool needs at least {least}")
        if self.draining:
            raise ServingError(ErrorCode.UNAVAILABLE, "the cluster is shutting down")
        async with self.scale_lock:
            members = [w for w in self.workers.values() if w.role == role and w.worker_id not in self.retiring]
            result = ScaleResult(role, before=len(members), after=replicas)
            if replicas > len(members):
                fresh = [self.spawn(role, self.next_index(role)) for _ in range(replicas - len(members))]
                await self.bring_up(fresh)
                result.added = [w.worker_id for w in fresh]
            elif replicas < len(members):
                loads = self.router.loads()
                # Least busy first; on a tie, the newest goes.
                members.sort(key=lambda w: (loads.get(w.worker_id, {}).get("requests", 0.0), -w.index))
                victims = members[: len(members) - replicas]
                result.removed = [w.worker_id for w in victims]
                await asyncio.gather(*(self._retire(w, drain_timeout_s) for w in victims))
            log.info("scaled %s", result)
            return result

    async def rebalance(self) -> tuple[Move | None, list[ScaleResult]]:
        """Move one worker to the phase under sustained pressure (see Router.rebalance_move): start one there, then
        drain one from the other pool."""
        move = self.router.rebalance_move()
        if move is None:
            return None, []

        def active(role: Role) -> int:
            return sum(w.role == role and w.worker_id not in self.retiring for w in self.workers.values())

        grown = await self._scale(move.target, active(move.target) + 1, SCALE_DRAIN_TIMEOUT_S)
        shrunk = await self._scale(move.source, active(move.source) - 1, SCALE_DRAIN_TIMEOUT_S)
        self.router.balance.gaps.clear()  # the next move needs a fresh window of evidence
        return move, [grown, shrunk]

    async def _retire(self, worker: WorkerHandle, drain_timeout_s: float) -> None:
        """Drain, then stop: requests still running at the deadline fail over to other workers (retried, no gap)."""
        self.retiring.add(worker.worker_id)
        self.router.set_draining(worker.worker_id)
        try:
            deadline = time.monotonic() + drain_timeout_s
            while self.using[worker.worker_id] > 0 and time.monotonic() < deadline:
                await asyncio.sleep(RETIRE_POLL_S)
            if self.using[worker.worker_id] > 0:
                log.warning(
                    "%s: %d requests still running after %.0f s of draining; they are retried elsewhere",
                    worker.worker_id,
                    self.using[worker.worker_id],
                    drain_timeout_s,
                )
            self.forget(worker)
            worker.stop()
        finally:
            self.retiring.discard(worker.worker_id)

    def forget(self, worker: WorkerHandle) -> None:
        if self.workers.get(worker.worker_id) is worker:
            del self.workers[worker.worker_id]
            self.router.remove_worker(worker.worker_id)

    def worker_status(self) -> list[dict[str, Any]]:
        """Each worker's state and the stats the health loop last polled (at most HEALTH_INTERVAL_S old). Not async,
        so a Prometheus collector can read it at scrape time."""
        return [
            {
                **(w.stats.__dict__ if w.stats else {}),
                "worker_id": w.worker_id,
                "role": w.role.value,  # the pool (a hybrid worker's own stats say "decode", the actor it runs)
                "healthy": w.healthy,
                "problem": w.problem,
                "restarts": w.restarts,
                "draining": w.worker_id in self.retiring,
                "device": w.info.get("device"),
                "gpu_uuid": w.info.get("gpu_uuid"),
                "tensor_parallel_size": self.pool(w.role).tensor_parallel_size,
                "gpus": self.pool(w.role).gpus_per_worker if self.config.cluster.device != Device.cpu else 0.0,
            }
            for w in list(self.workers.values())
        ]
