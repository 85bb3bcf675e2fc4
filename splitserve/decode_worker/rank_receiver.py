"""A decode worker's receiver when a request's KV comes over several links (head_map.py): from a prefill worker of
several TP ranks, or into a decode worker of several, or both.

Every rank of the decode worker has a receiver of its own, in its own process, and publishes its endpoint
(``ReceiverEndpoint.ranks`` on the leader's): the prefill ranks send each decode rank the KV heads it holds, into
its own cache, never through the leader. The leader's ``RankedReceiver`` is what the worker uses as its receiver:
``expect`` reserves the leader's links and has every follower reserve its own (``Expect`` on the group's side
channel, answered before the reservation returns, so no sender can reach a rank before it expects it); the request's
future is done once every rank's links landed, and fails, aborting every rank's, as soon as one rank's fails;
``abort`` and ``unwritten`` cover every rank. The pages are the leader's to free (its block manager owns every
rank's), and it frees them only once ``unwritten`` says no rank's sender can write them.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from splitserve.cluster.messages import ErrorCode, ServingError
from splitserve.cluster.rank_control import AbortLinks, FollowerControl, LeaderControl
from splitserve.cluster.rank_group import Followers, RankTransfer
from splitserve.cluster.worker_options import WorkerOptions
from splitserve.engine.runner import ModelRunner
from splitserve.kv_transfer import Receiver, TransferAborted, TransferError, TransferResult, TransferSpec, make_receiver
from splitserve.kv_transfer.base import PageSink, ReceiverEndpoint
from splitserve.kv_transfer.errors import PeerUnavailable
from splitserve.kv_transfer.head_map import links_to
from splitserve.worker_base import transfer_spec
from splitserve.worker_common import node_address


@dataclass(frozen=True)
class Expect:
    """Leader to follower: reserve your links of this request, into these blocks (the leader's block ids are every
    rank's). The follower's answers name ``token``, this reservation's: never an earlier one's of the same id."""

    token: int
    request_id: str
    num_tokens: int
    block_ids: list[int]


@dataclass(frozen=True)
class Expected:
    """Follower to leader: the reservation is made (``error`` None), or why not."""

    token: int
    error: str | None


@dataclass(frozen=True)
class Landed:
    """Follower to leader: every link of the request landed here (``error`` None), or the rank's part failed."""

    token: int
    result: TransferResult | None
    error: TransferError | None


@dataclass(frozen=True)
class Unwritten:
    """Follower to leader, after ``Landed``: no sender can write this rank's pages of the request any more."""

    token: int


def _outcome(done: Future[TransferResult]) -> tuple[TransferResult | None, TransferError | None]:
    """A rank's links' end: their result, or the error (any failure as a TransferError)."""
    error = done.exception()
    if error is None:
        return done.result(), None
    return None, error if isinstance(error, TransferError) else TransferError(repr(error))


def rank_specs(
    runner: ModelRunner, prefill_tp: int, request_id: str, num_tokens: int, blocks: list[int]
) -> list[TransferSpec]:
    """The transfers this rank receives of a request: one per link that ends here."""
    rank, size = runner.rank_and_size
    return [
        transfer_spec(runner, request_id, num_tokens, blocks, link)
        for link in links_to(runner.spec.num_kv_heads, prefill_tp, size, rank)
    ]


def decode_receiver(
    options: WorkerOptions, runner: ModelRunner, followers: Followers | None
) -> Receiver | RankedReceiver:
    """The decode worker's receiver: a plain one where the KV comes over one link (single ranks on both sides, or no
    prefill pool at all), else the leader's ``RankedReceiver``."""
    receiver = make_receiver(options.kv_transfer, runner, host=node_address())
    prefill_tp = options.prefill_tensor_parallel_size
    if prefill_tp is None or (prefill_tp == 1 and options.tensor_parallel_size == 1):
        return receiver
    control = followers.control if followers is not None else None
    endpoints = [info["endpoint"] for info in followers.info] if followers is not None else []
    return RankedReceiver(receiver, runner, prefill_tp, control, endpoints, options.kv_transfer.timeout_s)


class RankedRequest:
    """One request's transfers on every rank of the worker: done once each rank's landed, failed once one's
    failed; ``unwritten`` once no rank's sender can write, and never before the request is done (the worker frees
    a failed request's pages from there, reading why it failed)."""

    def __init__(self, token: int, request_id: str, ranks: list[int]):
        self.token = token
        self.request_id = request_id
        self.future: Future[TransferResult] = Future()
        self.unwritten: Future[None] = Future()
        self._lock = threading.Lock()
        self._landing = set(ranks)
        self._writing = set(ranks)
        self._results: list[TransferResult] = []

    def land(self, rank: int, result: TransferResult | None, error: TransferError | None) -> bool:
        """Rank ``rank``'s part ended; True where that failed the request (it was still pending)."""
        if error is not None:
            return self.fail(error)
        assert result is not None
        with self._lock:
            if self.future.done():
                return False
            self._landing.discard(rank)
            self._results.append(result)
            if self._landing:
                return False
            results = self._results
            self.future.set_result(
                TransferResult(
                    self.request_id,
                    sum(r.bytes for r in results),
                    max(r.seconds for r in results),
                    "+".join(sorted({r.backend for r in results})),
                )
            )
        self._settle()
        return False

    def fail(self, error: TransferError) -> bool:
        with self._lock:
            if self.future.done():
                return False
            self.future.set_exception(error)
        self._settle()
        return True

    def written(self, rank: int) -> None:
        """Rank ``rank``'s pages are past writing."""
        with self._lock:
            self._writing.discard(rank)
        self._settle()

    def _settle(self) -> None:
        with self._lock:
            if self._writing or not self.future.done() or self.unwritten.done():
                return
            self.unwritten.set_result(None)


class RankedReceiver:
    """The leader's receiver of a decode worker whose KV comes over several links (see the module docstring); the
    worker uses it as it would a ``Receiver``."""

    def __init__(
        self,
        local: Receiver,
        runner: ModelRunner,
        prefill_tp: int,
        control: LeaderControl | None,
        follower_endpoints: list[ReceiverEndpoint],
        timeout_s: float,
    ):
        self._local = local
        self._runner = runner
        self._prefill_tp = prefill_tp
        self._control = control
        self._timeout_s = timeout_s
        self.endpoint = replace(local.endpoint, ranks=tuple(follower_endpoints))
        self._ranks = [0, *(control.ranks if control is not None else [])]
        self._lock = threading.Lock()
        self._requests: dict[str, RankedRequest] = {}  # by request id: what abort and unwritten name
        self._tokens: dict[int, RankedRequest] = {}  # by reservation: what the followers' answers name
        self._next_token = itertools.count()
        self._acks: dict[int, tuple[set[int], dict[int, str], Future[None]]] = {}
        if control is not None:
            control.handler = self._on_message

    def expect(self, spec: TransferSpec, sink: PageSink | None = None) -> Future[TransferResult]:
        """Reserve ``spec``'s request on every rank (each its own links into the same blocks); returns once every
        rank expects it."""
        rid = spec.request_id
        specs = rank_specs(self._runner, self._prefill_tp, rid, spec.num_tokens, list(spec.dst_block_ids))
        request = RankedRequest(next(self._next_token), rid, self._ranks)
        local = self._local.expect_links(specs, sink)
        local_unwritten = self._local.unwritten(rid)
        with self._lock:
            self._requests[rid] = request
            self._tokens[request.token] = request
        request.unwritten.add_done_callback(lambda _: self._forget(request))
        local.add_done_callback(lambda done: self._local_landed(request, done))
        local_unwritten.add_done_callback(lambda _: request.written(0))
        if self._control is not None:
            refused = self._ask(Expect(request.token, rid, spec.num_tokens, list(spec.dst_block_ids)))
            if refused:
                why = "; ".join(f"rank {rank}: {error}" for rank, error in sorted(refused.items()))
                self.abort(rid, f"a rank refused it: {why}")
                for rank in refused:  # it reserved nothing: no word of it will come
                    request.written(rank)
                raise ServingError(ErrorCode.UNAVAILABLE, f"{rid}: a decode rank could not reserve its links: {why}")
        return request.future

    def _ask(self, message: Expect) -> dict[int, str]:
        """Send ``message`` to every follower and wait for each one's answer: the refusals, by rank (a rank silent
        past the timeout counts as one, though it may yet reserve: the abort that follows drops that too)."""
        assert self._control is not None
        acked: Future[None] = Future()
        waiting = set(self._control.ranks)
        refused: dict[int, str] = {}
        with self._lock:
            self._acks[message.token] = (waiting, refused, acked)
        try:
            self._control.broadcast(message)
            acked.result(self._timeout_s)
        except TimeoutError:
            with self._lock:
                silent = sorted(waiting)
            return {**refused, **dict.fromkeys(silent, f"no answer in {self._timeout_s} s")}
        finally:
            with self._lock:
                self._acks.pop(message.token, None)
        return refused

    def _on_message(self, rank: int, message: Any) -> None:
        """A follower's word, on its reader thread (in the order it sent them)."""
        if isinstance(message, Expected):
            with self._lock:
                waiting, refused, acked = self._acks.get(message.token, (set(), {}, None))
                waiting.discard(rank)
                if message.error is not None:
                    refused[rank] = message.error
                if acked is not None and not waiting and not acked.done():
                    acked.set_result(None)
            return
        with self._lock:
            request = self._tokens.get(message.token)
        if request is None:
            return
        if isinstance(message, Landed):
            if request.land(rank, message.result, message.error):
                self._local.abort(request.request_id, f"rank {rank}'s part failed: {message.error}")
                self._tell_followers(request.request_id, f"rank {rank}'s part failed: {message.error}")
        elif isinstance(message, Unwritten):
            request.written(rank)

    def _local_landed(self, request: RankedRequest, done: Future[TransferResult]) -> None:
        """The leader's own links ended. This may run under a lock of the failed link: the local receiver aborts its
        other links itself, so only the followers are told here."""
        result, error = _outcome(done)
        if request.land(0, result, error):
            self._tell_followers(request.request_id, f"rank 0's part failed: {error}")

    def _forget(self, request: RankedRequest) -> None:
        with self._lock:
            del self._tokens[request.token]
            if self._requests.get(request.request_id) is request:
                del self._requests[request.request_id]

    def _tell_followers(self, request_id: str, reason: str) -> None:
        if self._control is not None:
            self._control.broadcast(AbortLinks(request_id, reason))

    def abort(self, request_id: str, reason: str = "aborted by the receiver") -> bool:
        found = self._local.abort(request_id, reason)
        self._tell_followers(request_id, reason)
        with self._lock:
            request = self._requests.get(request_id)
        failed = request is not None and request.fail(TransferAborted(f"{request_id}: {reason}"))
        return found or failed

    def unwritten(self, request_id: str) -> Future[None]:
        with self._lock:
            request = self._requests.get(request_id)
        if request is not None:
            return request.unwritten
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @property
    def pending(self) -> int:
        """Requests whose pages a sender of some rank may still write: not only those still landing, so that a
        rank whose part never ends shows here."""
        with self._lock:
            return len(self._requests)

    def close(self) -> None:
        self._local.close()
        with self._lock:
            requests = list(self._requests.values())
        for request in requests:
            request.fail(PeerUnavailable("the receiver closed"))


class FollowerReceiver:
    """A decode follower's receiver: reserves its links of each request when the leader says (``Expect``), drops
    them when it says (``AbortLinks``), and tells it how each request's part ended (``Landed``, ``Unwritten``)."""

    def __init__(self, runner: ModelRunner, transfer: RankTransfer, control: FollowerControl):
        self._runner = runner
        self._prefill_tp = transfer.prefill_tensor_parallel_size
        self._control = control
        self.receiver = make_receiver(transfer.kv_transfer, runner, host=node_address())
        self.endpoint = self.receiver.endpoint

    def on_message(self, message: Any) -> None:
        if isinstance(message, Expect):
            self._expect(message)
        elif isinstance(message, AbortLinks):
            self.receiver.abort(message.key, message.reason)

    def _expect(self, order: Expect) -> None:
        rid = order.request_id
        try:
            specs = rank_specs(self._runner, self._prefill_tp, rid, order.num_tokens, order.block_ids)
            future = self.receiver.expect_links(specs)
            unwritten = self.receiver.unwritten(rid)
        except Exception as err:
            self._control.send(Expected(order.token, str(err)))
            return
        self._control.send(Expected(order.token, None))

        def landed(done: Future[TransferResult]) -> None:
            self._control.send(Landed(order.token, *_outcome(done)))
            unwritten.add_done_callback(lambda _: self._control.send(Unwritten(order.token)))

        future.add_done_callback(landed)
