"""What the prefill and decode worker actors share: the engine on its own thread, the release log, the ``ready``
answer, the ``stats`` call, and the layout of a request's KV transfer, which both sides must build identically."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from splitserve.cluster.channel import Outbox
from splitserve.cluster.messages import ChannelMessage, WorkerStats
from splitserve.cluster.rank_group import Followers, RankTransfer, start_leader
from splitserve.cluster.worker_options import WorkerOptions
from splitserve.engine.engine import Engine
from splitserve.engine.engine_thread import EngineThread
from splitserve.engine.runner import ModelRunner
from splitserve.gpu_stats import GpuReader
from splitserve.kv_transfer import TransferSpec
from splitserve.kv_transfer.head_map import HeadLink
from splitserve.roles import Role
from splitserve.worker_common import ReportsRequestTimes, RequestTimes, configure_worker_process, describe_device


def transfer_spec(
    runner: ModelRunner, request_id: str, num_tokens: int, dst_block_ids: list[int], link: HeadLink | None = None
) -> TransferSpec:
    """The transfer of ``num_tokens`` of prompt KV into ``dst_block_ids``: the sender and the receiver each build it
    with this, and the receiver refuses a sender whose layout differs.

    Between workers of several TP ranks, one per ``link`` at each end (``head_map.links_from`` on a prefill rank,
    ``links_to`` on a decode rank), built with that rank's runner: it carries the link's KV heads only."""
    page_shape = runner.page_shape
    if link is not None:
        held = runner.model.shard.kv_heads
        if link.kv_heads != runner.spec.num_kv_heads or held not in (link.src_held, link.dst_held):
            raise ValueError(
                f"link: {link} neither starts nor ends at this rank, which holds KV heads {held.start}-{held.stop - 1} "
                f"of {runner.spec.num_kv_heads}"
            )
        page_shape = (*page_shape[:2], len(link.heads), *page_shape[3:])
    return TransferSpec(
        request_id=request_id,
        num_layers=runner.spec.num_layers,
        num_tokens=num_tokens,
        dst_block_ids=dst_block_ids,
        page_shape=page_shape,
        dtype=str(runner.dtype).removeprefix("torch."),
        link=link,
    )


class WorkerBase(ReportsRequestTimes):
    """An engine driven by one ``EngineThread`` (running ``_step``), in a process set up for it.

    A subclass gives its ``role``, its ``_step``, and ``_load`` (its part of the stats, read on the engine thread).
    """

    role: Role
    # Whether ``_load`` reads only what a step in flight leaves alone, so that stats need not wait for the step.
    _stats_during_step = False

    def __init__(self, worker_id: str, options: WorkerOptions):
        configure_worker_process()
        self.worker_id = worker_id
        self.options = options
        self.followers: Followers | None = None  # the other ranks of a tensor-parallel worker, which this one leads
        if options.tensor_parallel_size > 1:
            transfer = None
            if options.prefill_tensor_parallel_size is not None:  # KV moves between pools: every rank its share
                transfer = RankTransfer(self.role, options.kv_transfer, options.prefill_tensor_parallel_size)
            self.engine, self.followers = start_leader(options.engine_config(), options.tensor_parallel_size, transfer)
        else:
            self.engine = Engine(options.engine_config())
        self.releases = RequestTimes()
        self.aborts = RequestTimes()
        self._gpu = GpuReader.for_device(self.engine.runner.device)
        # For the router's prefix index (``_send_cache_events``), which only cache_aware reads.
        self.engine.blocks.record_events = options.cache_events
        self._outbox = Outbox()  # the channel's (``outputs``); posted to on the default event loop only
        self._loop: asyncio.AbstractEventLoop | None = None  # the default event loop, once ``ready`` ran on it
        # Its first ``_step`` waits for a call or a wake-up, which nothing makes before the subclass is set up.
        self._thread = EngineThread(self._step_and_report, name=f"{worker_id}-engine")
        # While a step waits for the device, the engine is let go of: the calls each worker submits ``during_step``
        # (freeing or reserving pages that no step in flight can write before it ends) run then, not after it.
        self.engine.device_wait = self._thread.device_wait

    def _step(self) -> bool:
        """One round of the engine thread's work; True while there is more."""
        raise NotImplementedError

    def _step_and_report(self) -> bool:
        more = self._step()
        self._send_cache_events()
        return more

    def _send_cache_events(self) -> None:
        """On the engine thread, after a step: the prefix cache's changes (that step's, and those of the calls run
        since the last step) go to the router on the channel, one item per step at most. Before ``ready`` there is
        no loop to post on; they stay with the engine until the next step."""
        if self._loop is None:
            return
        events = self.engine.blocks.take_events()
        if events is not None:
            message: ChannelMessage = [events]
            self._loop.call_soon_threadsafe(self._outbox.post, message)

    def _load(self) -> dict[str, Any]:
        """This role's WorkerStats fields (``extra`` merged into the common one), read on the engine thread."""
        raise NotImplementedError

    def _info(self, **extra: Any) -> dict:
        """The ``ready`` answer: what the cluster registers the worker with."""
        runner = self.engine.runner
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "kv_blocks": runner.num_kv_blocks,
            "block_size": runner.block_size,
            "max_model_len": self.engine.max_model_len,
            "vocab_size": self.engine.spec.vocab_size,
            "tensor_parallel_size": self.options.tensor_parallel_size,
            "followers": self.followers.info if self.followers is not None else [],
            **extra,
            **describe_device(runner.device),
        }

    async def stats(self) -> WorkerStats:
        def collect() -> WorkerStats:
            e = self.engine
            load = self._load()
            extra = {
                "engine_failed": float(self._thread.error is not None),
                "time": time.time(),
                "held": float(len(e.held)),
                **load.pop("extra", {}),
                **e.step_times.as_extra(),
                **(e.runner.step_channel.as_extra() if e.runner.step_channel is not None else {}),
            }
            return WorkerStats(
                worker_id=self.worker_id,
                role=self.role,
                kv_blocks_total=e.blocks.num_blocks,
                kv_blocks_free=e.blocks.num_free,
                prefix_cache_lookup_blocks=e.blocks.prefix_queries,
                prefix_cache_hit_blocks=e.blocks.prefix_hits,
                extra=extra,
                **load,
            )

        submitted = self._thread.submit(collect, during_step=self._stats_during_step)
        stats: WorkerStats = await asyncio.wrap_future(submitted)
        stats.extra.update(self._gpu.read())  # off the engine thread: it never waits on the driver
        return stats
