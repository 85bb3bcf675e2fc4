"""A tensor-parallel worker as Ray actors: one unit to the cluster, N ranks underneath.

The pool reserves a placement group per worker (one bundle per rank, STRICT_PACK: one node) and starts the worker
actor in bundle 0. That actor is rank 0, the leader: it owns the scheduler, and from its set-up it starts a
``RankFollower`` in each other bundle, rendezvouses with them (``init_rank_group`` at a port of its node) and builds
its engine beside theirs. From then on each step reaches the followers through the ``StepChannel`` (one gloo
broadcast), never through a Ray call.

The group lives and dies as one: a follower's ``run`` ends only with the group, and its end ends the leader's process
too (the pool then sees the worker die and restarts the whole group); a rank whose step fails exits, so the others'
collectives fail at once rather than wait on it; and the followers die with the leader, their owner, and with the
placement group the pool removes.

In mode: disaggregated each rank also moves its own share of every request's KV (``RankTransfer``): a prefill rank
sends the KV heads it holds, a decode rank receives the heads it holds, rank to rank. What that needs beyond the
steps goes over the group's side channel (rank_control.py): the leader's orders (``LeaderControl``), each rank's
word that its part ended.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from splitserve.cluster.rank_control import ControlAddress, FollowerControl, LeaderControl
from splitserve.config import Device, KVTransferConfig, _PoolConfig
from splitserve.engine.engine import Engine, EngineConfig
from splitserve.engine.rank_loop import StepHooks, follow, free_port
from splitserve.engine.runner import ModelRunner, RunnerConfig, resolve_device
from splitserve.engine.tensor_parallel import RankGroup, init_rank_group
from splitserve.kv_transfer.base import ReceiverEndpoint
from splitserve.roles import Role
from splitserve.worker_common import configure_worker_process, describe_device

log = logging.getLogger(__name__)

# A bundle must reserve something. CPU ranks share the node's cores as every CPU worker does (a worker claims no
# CPU), so each rank reserves a token share: enough to pin the group to one node, not enough to crowd it out.
CPU_PER_RANK = 0.01
ACCELERATOR_SHARE = 0.001  # what Ray's own ``accelerator_type`` option reserves
RENDEZVOUS_POLL_S = 0.2
CONTROL_JOIN_S = 30.0  # a follower's connection is made in its set-up, which is over by then: this is a backstop


def rank_bundles(pool: _PoolConfig, device: Device) -> list[dict[str, float]]:
    """One bundle per rank: a whole GPU (of the pool's type) on CUDA, a token CPU share on CPU."""
    if device == Device.cpu:
        bundle = {"CPU": CPU_PER_RANK}
    else:
        bundle = {"GPU": 1.0}
        if pool.gpu_type:
            bundle[f"accelerator_type:{pool.gpu_type}"] = ACCELERATOR_SHARE
    return [dict(bundle) for _ in range(pool.tensor_parallel_size)]


def bundle_options(bundle: dict[str, float], group: PlacementGroup, index: int) -> dict[str, Any]:
    """Actor options that take exactly bundle ``index`` of ``group``."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return {
        "num_cpus": bundle.get("CPU", 0),
        "num_gpus": bundle.get("GPU", 0),
        **({"resources": custom} if custom else {}),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
    }


@dataclass(frozen=True)
class RankTransfer:
    """A worker's part in moving KV, which each of its ranks plays for its own KV heads (mode: disaggregated)."""

    role: Role  # prefill: each rank sends the heads it holds; decode: each rank receives the heads it holds
    kv_transfer: KVTransferConfig
    prefill_tensor_parallel_size: int  # the senders' ranks, which a decode rank's links come from


class RankFollower:
    """Rank ``rank`` of a tensor-parallel worker: the leader's model shard, running each step the leader hands
    over. Its set-up joins the group and builds the runner (with collectives the leader's set-up meets); ``run``
    then lasts as long as the group. With a ``transfer`` part it also sends (prefill) or receives (decode) its KV
    heads of each request, as the leader's orders on ``control`` and in the steps say."""

    def __init__(
        self,
        rank: int,
        size: int,
        init_method: str,
        config: RunnerConfig,
        transfer: RankTransfer | None = None,
        control: ControlAddress | None = None,
    ):
        configure_worker_process()
        # Ray shows an actor one GPU, its own: the rank's device is the first visible one.
        self.group = init_rank_group(rank, size, init_method, resolve_device(config.device), cuda_index=0)
        self.runner = ModelRunner(config, rank_group=self.group)
        self.hooks: StepHooks | None = None
        self.endpoint: ReceiverEndpoint | None = None  # a decode rank's receiver's
        if transfer is not None and control is not None:
            self._join_transfers(transfer, FollowerControl(control, rank))

    def _join_transfers(self, transfer: RankTransfer, control: FollowerControl) -> None:
        # Imported here: the workers' modules import this one.
        if transfer.role == Role.DECODE:
            from splitserve.decode_worker.rank_receiver import FollowerReceiver

            receiver = FollowerReceiver(self.runner, transfer, control)
            self.endpoint = receiver.endpoint
            control.start(receiver.on_message)
        else:
            from splitserve.prefill_worker.rank_sends import FollowerSends

            sends = FollowerSends(self.runner, transfer.kv_transfer, control)
            self.hooks = sends
            control.start(sends.on_message)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"rank": self.group.rank, **describe_device(self.runner.device)}
        if self.endpoint is not None:
            info["endpoint"] = self.endpoint
        return info

    def run(self) -> int:
        """Follow the leader until it stops the group; the steps run. A step that fails here (a rank died, or this
        rank's pass raised) ends the process: alive, it would keep its connections open, and the other ranks would
        wait on it in their next collective instead of failing."""
        try:
            return follow(self.runner, self.group, self.hooks)
        except BaseException:
            log.exception("tensor-parallel rank %d failed; it leaves the group", self.group.rank)
            os._exit(1)


@dataclass
class Followers:
    """The leader's view of its followers: their actors, and whether the group still stands."""

    actors: list[Any]  # held for the group's life: Ray ends an actor once no handle to it is left
    info: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None  # why the group broke, once a follower's run ended
    joined: bool = False  # set once every rank has joined: from then on a broken group ends the leader
    control: LeaderControl | None = None  # the side channel of the ranks' KV transfers, where they move KV

    def watch(self, runs: list[ray.ObjectRef]) -> None:
        """React as soon as any follower's run ends: it ends only when the group does."""
        for rank, run in enumerate(runs, start=1):
            run.future().add_done_callback(functools.partial(self._ended, rank))

    def _ended(self, rank: int, future: Future) -> None:
        """Before every rank has joined, the leader's set-up fails with the reason. After, the leader's process ends
        (it may be waiting on the lost rank in a collective, which nccl would only give up after its timeout): the
        pool sees the worker die (its health check, its token channel) and restarts the whole group, and its
        requests are retried, whether or not a step was running."""
        error = future.exception()
        # Ray's error text goes on with the actor's details; its first line says what happened.
        how = "stopped" if error is None else f"died: {str(error).strip().splitlines()[0]}"
        if self.failure is None:
            self.failure = f"tensor-parallel rank {rank} {how}"
        if self.joined:
            log.error("%s: the worker's group is broken and it exits, for its pool to restart it", self.failure)
            os._exit(1)


def start_leader(config: EngineConfig, size: int, transfer: RankTransfer | None = None) -> tuple[Engine, Followers]:
    """In the worker actor: start its ``size - 1`` followers in its placement group's other bundles, join them as
    rank 0 and build the engine, which leads the group. A follower that fails before the group forms fails this.
    With ``transfer``, the followers take their part in the worker's KV transfers (``RankTransfer``)."""
    group_placement = get_current_placement_group()
    if group_placement is None:
        raise RuntimeError("a tensor-parallel worker must run in its placement group (the pool reserves one)")
    runner_config = Engine.runner_config(config)
    # STRICT_PACK puts every rank on this node: loopback reaches them all.
    init_method = f"tcp://127.0.0.1:{free_port()}"
    control = LeaderControl(size) if transfer is not None else None
    address = control.address if control is not None else None
    follower_cls: Any = ray.remote(max_restarts=0)(RankFollower)
    actors: list[Any] = []
    for rank in range(1, size):
        bundle = group_placement.bundle_specs[rank]
        options = bundle_options(bundle, group_placement, rank)
        actors.append(follower_cls.options(**options).remote(rank, size, init_method, runner_config, transfer, address))
    followers = Followers(actors, control=control)
    described = [actor.describe.remote() for actor in actors]
    runs = [actor.run.remote() for actor in actors]  # queued behind describe: an actor runs its calls in order
    followers.watch(runs)
    device = resolve_device(config.runner.device)
    rank_group = _join_as_leader(size, init_method, device, followers)
    followers.joined = True
    if followers.failure is not None:  # a follower ended between the rendezvous and the flag
        raise RuntimeError(f"the tensor-parallel group broke as it formed: {followers.failure}")
    engine = Engine(config, rank_group=rank_group)
    followers.info = ray.get(described)
    if control is not None:  # each follower connects in its set-up, which ``describe`` followed
        control.wait_joined(CONTROL_JOIN_S)
    return engine, followers


def _join_as_leader(size: int, init_method: str, device: torch.device, followers: Followers) -> RankGroup:
    """Rendezvous as rank 0, failing as soon as a follower fails instead of waiting out the rendezvous timeout."""
    joined: dict[str, Any] = {}

    def join() -> None:
        try:
            joined["group"] = init_rank_group(0, size, init_method, device, cuda_index=0)
        except BaseException as err:  # handed to the waiting thread
            joined["error"] = err

    thread = threading.Thread(target=join, name="rank-rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        if followers.failure is not None:
            raise RuntimeError(f"the tensor-parallel group did not form: {followers.failure}")
        thread.join(RENDEZVOUS_POLL_S)
    if "error" in joined:
        raise joined["error"]
    return joined["group"]
