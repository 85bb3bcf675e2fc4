"""How a decode group's leader combines its ranks' parts of a request's KV transfer (``RankedRequest``): done once
every rank's landed, failed by the first that fails, and never past writing before it is done, whichever order the
ranks' words come in (the worker frees a failed request's pages from ``unwritten``, reading why it failed)."""

from __future__ import annotations

from splitserve.decode_worker.rank_receiver import RankedRequest
from splitserve.kv_transfer import TransferAborted, TransferResult
from splitserve.kv_transfer.errors import PeerUnavailable


def _result(nbytes: int, seconds: float, backend: str) -> TransferResult:
    return TransferResult("req", nbytes, seconds, backend)


def test_done_once_every_rank_landed_and_past_writing_only_after():
    request = RankedRequest(7, "req", [0, 1, 2])
    request.written(0)  # a rank's pages can be past writing before its landing is counted
    request.land(0, _result(10, 0.1, "tcp"), None)
    request.land(2, _result(30, 0.3, "grpc"), None)
    request.written(2)
    request.written(1)
    assert not request.future.done() and not request.unwritten.done()
    assert request.land(1, _result(20, 0.2, "tcp"), None) is False
    assert request.future.result() == TransferResult("req", 60, 0.3, "grpc+tcp")
    assert request.unwritten.done()


def test_the_first_failure_fails_it_and_past_writing_waits_for_every_rank():
    request = RankedRequest(7, "req", [0, 1])
    request.land(0, _result(10, 0.1, "tcp"), None)
    assert request.land(1, None, PeerUnavailable("rank 1's sender went away")) is True
    assert request.fail(TransferAborted("req: aborted")) is False  # the first word stays
    assert isinstance(request.future.exception(), PeerUnavailable)
    request.written(1)
    assert not request.unwritten.done()  # rank 0's sender may still write
    request.written(0)
    assert request.unwritten.done()
