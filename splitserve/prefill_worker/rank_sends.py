"""A prefill worker's KV transfers, one per request: over one link between single-rank workers, else over every link
of head_map.py, each sent by the prefill rank at its start straight to the decode rank at its end.

Every rank of the prefill worker computes the same prompts in the same pass, and each sends the KV heads it holds
from its own layer hook: the leader its links (``PrefillTransfers.begin``), each follower its own (``FollowerSends``).
A follower learns of the request in the step that completes its prompt: the leader attaches the step's transfer
orders (``SendOrder``: the request, its pages here, the decode worker's endpoints) to the step hand-off
(``StepChannel.attach``). What comes later goes over the group's side channel (rank_control.py): the decode side's
pages once reserved (``OpenSends``), an abort (``AbortLinks``), and
back from each follower the end of its part (``SendsEnded``). The leader's ``RequestSend`` is done once every rank's
part is: only then is the request's KV reported landed, or its pages freed.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from splitserve.cluster.rank_control import AbortLinks, FollowerControl, LeaderControl
from splitserve.config import KVTransferConfig
from splitserve.engine.runner import ModelRunner
from splitserve.kv_transfer import ReceiverEndpoint, Sender, SendHandle, TransferError, TransferSpec, make_sender
from splitserve.kv_transfer.deferred import DeferredSend
from splitserve.kv_transfer.errors import TransferAborted, TransferTimeout
from splitserve.kv_transfer.head_map import HeadLink, links_from
from splitserve.kv_transfer.rank_send import LinkSends
from splitserve.worker_base import transfer_spec

log = logging.getLogger(__name__)

_REMEMBERED = 4096  # a follower's memory of pages and aborts that came before their request's step


@dataclass(frozen=True)
class SendOrder:
    """In a step's attachment: a prompt that completes in the step, whose KV each rank sends over its links."""

    key: str  # the attempt's, unique on this worker
    request_id: str
    num_tokens: int
    src_block_ids: list[int]  # the leader's block ids are every rank's
    endpoint: ReceiverEndpoint  # the decode worker's, every rank's in ``by_rank``


@dataclass(frozen=True)
class OpenSends:
    """Leader to followers: the decode worker's pages for the attempt's KV, past the ``skip_blocks`` it holds."""

    key: str
    block_ids: list[int]
    skip_blocks: int = 0


@dataclass(frozen=True)
class SendsEnded:
    """Follower to leader: its part of the attempt's transfer ended: ``bytes`` sent, or ``error``."""

    key: str
    bytes: int
    error: TransferError | None


def _begin(sender: Sender, spec: TransferSpec, dst_block_ids: list[int]) -> SendHandle:
    return sender.begin(replace(spec, dst_block_ids=dst_block_ids))


class _LinkSenders:
    """One rank's side of building a request's sends: a sender per decode-rank endpoint, kept for later requests."""

    def __init__(self, runner: ModelRunner, config: KVTransferConfig):
        self.runner = runner
        self.config = config
        self._senders: dict[ReceiverEndpoint, Sender] = {}

    def sends(self, request_id: str, num_tokens: int, blocks: list[int], endpoint: ReceiverEndpoint) -> LinkSends:
        """This rank's transfers of the request, one per link that starts here, each opening once the decode side's
        pages are known (``DeferredSend``). Between single-rank workers, one transfer of every head, as always."""
        runner = self.runner
        rank, size = runner.rank_and_size
        endpoints = endpoint.by_rank
        kv_heads = runner.spec.num_kv_heads
        links: list[tuple[HeadLink, HeadLink | None]]
        if size == 1 and len(endpoints) == 1:
            links = [(HeadLink.whole(kv_heads), None)]
        else:
            links = [(link, link) for link in links_from(kv_heads, size, len(endpoints), rank)]
        handles = []
        for link, carried in links:
            sender = self._sender(endpoints[link.dst_rank])
            spec = transfer_spec(runner, request_id, num_tokens, dst_block_ids=[], link=carried)
            handles.append((link, DeferredSend(partial(_begin, sender, spec), self.config.timeout_s)))
        return LinkSends(runner, runner.block_index(blocks), handles)

    def backend(self, endpoint: ReceiverEndpoint) -> str:
        return self._sender(endpoint).backend

    def _sender(self, endpoint: ReceiverEndpoint) -> Sender:
        sender = self._senders.get(endpoint)
        if sender is None:
            sender = make_sender(self.config, endpoint, self.runner.device)
            self._senders[endpoint] = sender
        return sender


class RequestSend:
    """The leader's handle on one attempt's transfer: its own links, and its followers' parts (``ended``: one
    future per follower, done with the bytes it sent or failed with its error)."""

    def __init__(
        self,
        key: str,
        own: LinkSends[DeferredSend],
        backend: str,
        control: LeaderControl | None,
        ended: dict[int, Future[int]],
        timeout_s: float,
    ):
        self.key = key
        self.backend = backend
        self._own = own
        self._control = control
        self._ended = ended
        self._timeout_s = timeout_s

    @property
    def settled(self) -> bool:
        """Opened, or ended unopened: ``open`` has nothing more to do."""
        return all(handle.settled for handle in self._own.handles)

    def send_layer(self, layer: int) -> None:
        """From the engine's layer hook: this rank's heads of ``layer``, one gathered copy per link."""
        self._own.send_layer(layer)

    def open(self, dst_block_ids: list[int], skip_blocks: int = 0) -> None:
        """The decode worker's pages, which it holds the first ``skip_blocks`` of the prompt's blocks past (its
        prefix cache): every rank sends the rest."""
        _open_all(self._own, dst_block_ids, skip_blocks)
        if self._control is not None:
            self._control.broadcast(OpenSends(self.key, dst_block_ids, skip_blocks))

    def fail(self, error: TransferError) -> None:
        """The pages will never come: end it unopened, on every rank."""
        _fail_all(self._own, error)
        self._tell_followers(str(error))

    def abort(self, reason: str) -> None:
        self._own.abort(reason)
        self._tell_followers(reason)

    def finish(self) -> int:
        """Wait for every rank's part (this rank's first); the bytes of all. The first failure aborts the followers'
        parts still under way and is raised once they have all ended."""
        failure: TransferError | None = None
        total = 0
        try:
            total += self._own.finish()
        except TransferError as err:
            failure = err
            self._tell_followers(f"rank 0's part failed: {err}")
        for rank, ended in sorted(self._ended.items()):
            try:
                total += ended.result(self._timeout_s)
            except TimeoutError:
                failure = failure or TransferTimeout(f"rank {rank}'s part did not end in {self._timeout_s} s")
            except TransferError as err:
                if failure is None:  # this rank's own links have ended already: the other followers' may not have
                    failure = err
                    self._tell_followers(f"rank {rank}'s part failed: {err}")
        if failure is not None:
            raise failure
        return total

    def _tell_followers(self, reason: str) -> None:
        if self._control is not None and self._ended:
            self._control.broadcast(AbortLinks(self.key, reason))


class PrefillTransfers:
    """The prefill worker's (the leader's, with followers) maker of each attempt's ``RequestSend``."""

    def __init__(self, runner: ModelRunner, config: KVTransferConfig, control: LeaderControl | None):
        self._links = _LinkSenders(runner, config)
        self._control = control
        self._orders: list[SendOrder] = []  # of the pass being set up: they go with its step
        self._ended: dict[str, dict[int, Future[int]]] = {}
        self._lock = threading.Lock()
        if control is not None:
            control.handler = self._on_message

    def begin(
        self, key: str, request_id: str, num_tokens: int, blocks: list[int], endpoint: ReceiverEndpoint
    ) -> RequestSend:
        """On the engine thread, as the attempt's last pass is set up: its sends from every rank (the followers'
        go with the pass's step, ``hand_over``)."""
        own = self._links.sends(request_id, num_tokens, blocks, endpoint)
        ended: dict[int, Future[int]] = {}
        if self._control is not None:
            ended = {rank: Future() for rank in self._control.ranks}
            with self._lock:
                self._ended[key] = ended
            for future in ended.values():
                future.add_done_callback(lambda _: self._forget(key, ended))
            self._orders.append(SendOrder(key, request_id, num_tokens, list(blocks), endpoint))
        timeout_s = self._links.config.timeout_s * 2  # a follower's own timeouts end its part well before
        return RequestSend(key, own, self._links.backend(endpoint), self._control, ended, timeout_s)

    def hand_over(self) -> None:
        """Attach the orders of the pass being set up to its step, which the followers receive before it runs."""
        channel = self._links.runner.step_channel
        if self._orders and channel is not None:
            channel.attach(pickle.dumps(self._orders))
        self._orders = []

    def _on_message(self, rank: int, message: Any) -> None:
        if not isinstance(message, SendsEnded):
            return
        with self._lock:
            future = self._ended.get(message.key, {}).get(rank)
        if future is None or future.done():
            return
        if message.error is not None:
            future.set_exception(message.error)
        else:
            future.set_result(message.bytes)

    def _forget(self, key: str, ended: dict[int, Future[int]]) -> None:
        with self._lock:
            if self._ended.get(key) is ended and all(future.done() for future in ended.values()):
                del self._ended[key]


class FollowerSends:
    """A prefill follower's part (rank_loop.StepHooks): the sends of the prompts its steps complete, over its links;
    their pages and aborts as the leader's messages say; each attempt's end told back to the leader."""

    def __init__(self, runner: ModelRunner, config: KVTransferConfig, control: FollowerControl):
        self._links = _LinkSenders(runner, config)
        self._control = control
        self._lock = threading.Lock()
        self._sends: dict[str, LinkSends[DeferredSend]] = {}  # by attempt key, until their part ends
        self._early_pages: OrderedDict[str, OpenSends] = OrderedDict()  # pages that came before their step
        self._early_aborts: OrderedDict[str, str] = OrderedDict()
        self._step: list[tuple[str, LinkSends[DeferredSend]]] = []

    def layer_hook(self, attachment: bytes):
        """The step's orders begun; the hook that sends each layer's heads of them."""
        self._step = [(order.key, self._begin(order)) for order in pickle.loads(attachment)]
        step = list(self._step)

        def on_layer(layer: int) -> None:
            for _, sends in step:
                sends.send_layer(layer)

        return on_layer

    def _begin(self, order: SendOrder) -> LinkSends[DeferredSend]:
        sends = self._links.sends(order.request_id, order.num_tokens, order.src_block_ids, order.endpoint)
        with self._lock:
            self._sends[order.key] = sends
            pages = self._early_pages.pop(order.key, None)
            aborted = self._early_aborts.pop(order.key, None)
        if aborted is not None:
            _fail_all(sends, TransferAborted(f"aborted by the sender ({aborted})"))
        elif pages is not None:
            _open_all(sends, pages.block_ids, pages.skip_blocks)
        return sends

    def step_done(self) -> None:
        """The pass has sent every layer: wait for each transfer on a thread of its own, and tell the leader."""
        for key, sends in self._step:
            threading.Thread(target=self._finish, args=(key, sends), name=f"transfer-{key}", daemon=True).start()
        self._step = []

    def _finish(self, key: str, sends: LinkSends[DeferredSend]) -> None:
        sent, error = 0, None
        try:
            sent = sends.finish()
        except TransferError as err:
            error = err
        except Exception as err:  # never leave the leader waiting
            error = TransferError(repr(err))
        finally:
            with self._lock:
                self._sends.pop(key, None)
        self._control.send(SendsEnded(key, sent, error))

    def on_message(self, message: Any) -> None:
        if isinstance(message, OpenSends):
            with self._lock:
                sends = self._sends.get(message.key)
                if sends is None:
                    _remember(self._early_pages, message.key, message)
            if sends is not None:
                _open_all(sends, message.block_ids, message.skip_blocks)
        elif isinstance(message, AbortLinks):
            with self._lock:
                sends = self._sends.get(message.key)
                if sends is None:
                    _remember(self._early_aborts, message.key, message.reason)
            if sends is not None:
                sends.abort(message.reason)


def _open_all(sends: LinkSends[DeferredSend], dst_block_ids: list[int], skip_blocks: int) -> None:
    """The decode side's pages are known: open every link of the request from this rank."""
    for handle in sends.handles:
        handle.open(dst_block_ids, skip_blocks)


def _fail_all(sends: LinkSends[DeferredSend], error: TransferError) -> None:
    """The pages will never come: end every link of the request from this rank unopened."""
    for handle in sends.handles:
        handle.fail(error)


def _remember(memory: OrderedDict[str, Any], key: str, value: Any) -> None:
    memory[key] = value
    while len(memory) > _REMEMBERED:
        memory.popitem(last=False)
