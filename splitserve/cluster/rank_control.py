"""The side channel between a tensor-parallel worker's leader and its followers, for what does not follow the steps:
a request's KV-transfer bookkeeping on each rank (the decode side's expectations, the prefill side's destination
pages, aborts, and each rank's word that its part landed or ended).

One loopback connection per follower (STRICT_PACK puts every rank on the leader's node), carrying small pickled
messages both ways; a reader thread on each end hands each message to its handler in the order it was sent. The
leader's messages carry whole batches where the router batches its calls, so its cost is per call, never a Ray
round trip per request per rank. A follower that dies closes its connection; the group then ends (rank_group.py).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[int, Any], None]
"""Called on a reader thread with the sending rank and its message."""


@dataclass(frozen=True)
class ControlAddress:
    """Where the followers reach their leader's channel, and the key that proves they belong to its group."""

    host: str
    port: int
    authkey: bytes


@dataclass(frozen=True)
class AbortLinks:
    """Leader to followers: drop your links of the transfer ``key`` (the request's id on a decode worker, the
    attempt's key on a prefill worker), and tell their other ends ``reason``."""

    key: str
    reason: str


class _Link:
    """One connection: sends from any thread (one at a time), reads on a thread of its own."""

    def __init__(self, conn: Connection, peer: int, name: str):
        self.conn = conn
        self.peer = peer
        self._send_lock = threading.Lock()
        self._name = name

    def send(self, message: Any) -> None:
        with self._send_lock:
            self.conn.send(message)

    def read(self, handler: Handler) -> None:
        threading.Thread(target=self._read, args=(handler,), name=self._name, daemon=True).start()

    def _read(self, handler: Handler) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return  # the other end is gone: the group ends with it (rank_group.Followers)
            try:
                handler(self.peer, message)
            except Exception:
                log.exception("rank control: a message from rank %d failed", self.peer)


class LeaderControl:
    """The leader's end: accepts its ``size - 1`` followers, sends to them, and hands what they send to ``handler``
    (set before the first message that asks them anything)."""

    def __init__(self, size: int):
        authkey = secrets.token_bytes(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        host, port = self._listener.address
        self.address = ControlAddress(host, port, authkey)
        self.handler: Handler = lambda rank, message: log.warning("rank control: no handler for %r", message)
        self._links: dict[int, _Link] = {}
        self._joined = threading.Event()
        self._size = size
        threading.Thread(target=self._accept, name="rank-control-accept", daemon=True).start()

    def _accept(self) -> None:
        try:
            while len(self._links) < self._size - 1:
                conn = self._listener.accept()
                rank = conn.recv()
                link = self._links[rank] = _Link(conn, rank, f"rank-control-{rank}")
                link.read(lambda peer, message: self.handler(peer, message))
        except (EOFError, OSError) as err:  # a follower died as it joined: the group does not form
            log.warning("rank control: a follower did not join: %s", err)
            return
        finally:
            self._listener.close()
        self._joined.set()

    def wait_joined(self, timeout_s: float) -> None:
        if not self._joined.wait(timeout_s):
            raise RuntimeError(f"tensor-parallel followers did not open their control channel in {timeout_s} s")

    @property
    def ranks(self) -> list[int]:
        return sorted(self._links)

    def send(self, rank: int, message: Any) -> None:
        self._links[rank].send(message)

    def broadcast(self, message: Any) -> None:
        for link in self._links.values():
            link.send(message)


class FollowerControl:
    """A follower's end: connects in its set-up; ``start`` begins reading the leader's messages."""

    def __init__(self, address: ControlAddress, rank: int):
        self.rank = rank
        conn = Client((address.host, address.port), authkey=address.authkey)
        conn.send(rank)
        self._link = _Link(conn, 0, f"rank-control-from-leader-{rank}")

    def start(self, handler: Callable[[Any], None]) -> None:
        self._link.read(lambda _, message: handler(message))

    def send(self, message: Any) -> None:
        self._link.send(message)
