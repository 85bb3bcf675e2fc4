"""What a prefill rank runs to send its links of a request (tests/kv_transfer/test_tp_transfer.py): importable by
the follower processes of ``rank_loop.offline_engine``, which call ``follower_sends`` once the leader stops them."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.config import KVTransferConfig
from splitserve.engine.runner import ModelRunner
from splitserve.engine.testing import save_rank_state
from splitserve.kv_transfer import ReceiverEndpoint, Sender, make_sender
from splitserve.kv_transfer.base import SendHandle
from splitserve.kv_transfer.head_map import links_from
from splitserve.kv_transfer.rank_send import LinkSends
from splitserve.worker_base import transfer_spec


@dataclass(frozen=True)
class Route:
    """Where one request's KV goes: a decode worker of ``len(endpoints)`` ranks, its blocks reserved for it."""

    request_id: str
    backend: str
    endpoints: tuple[ReceiverEndpoint, ...]  # by decode rank
    dst_blocks: tuple[int, ...]


def begin_sends(
    runner: ModelRunner, routes: list[Route], src_blocks: list[int], num_tokens: int
) -> tuple[list[LinkSends[SendHandle]], list[Sender]]:
    """This rank's transfers of every route, begun: one per link that starts here."""
    group = runner.rank_group
    rank, size = (group.rank, group.size) if group is not None else (0, 1)
    blocks = runner.block_index(src_blocks)
    sends, senders = [], []
    for route in routes:
        by_rank = {}
        for link in links_from(runner.spec.num_kv_heads, size, len(route.endpoints), rank):
            sender = make_sender(KVTransferConfig(backend=route.backend), route.endpoints[link.dst_rank])
            senders.append(sender)
            spec = transfer_spec(runner, route.request_id, num_tokens, list(route.dst_blocks), link)
            by_rank[link] = sender.begin(spec)
        sends.append(LinkSends(runner, blocks, list(by_rank.items())))
    return sends, senders


def finish(sends: list[LinkSends[SendHandle]], senders: list[Sender]) -> None:
    try:
        for send in sends:
            send.finish()
    finally:
        for sender in senders:
            sender.close()


def send_after_prefill(runner: ModelRunner, routes: list[Route], src_blocks: list[int], num_tokens: int) -> None:
    sends, senders = begin_sends(runner, routes, src_blocks, num_tokens)
    for layer in range(runner.spec.num_layers):
        for send in sends:
            send.send_layer(layer)
    finish(sends, senders)


def follower_sends(
    runner: ModelRunner, routes: list[Route], src_blocks: list[int], num_tokens: int, directory: str
) -> None:
    """In a follower's process: keep its pages for the test to compare, then send its links."""
    save_rank_state(runner, directory)
    send_after_prefill(runner, routes, src_blocks, num_tokens)
