"""Timestamps of each request's hand-off from prefill to decode: where the time between the first and the second
token goes, across the router, both workers and the transfer (a 120 ms KV landing on a busy decode worker was
found this way).

Off unless ``SPLITSERVE_HANDOFF_TRACE`` names a directory: then every process appends ``<clock> <event>
<request id>`` lines to ``<dir>/<pid>.log``. The clock is ``time.perf_counter`` (CLOCK_MONOTONIC on Linux), which the
processes of one host share. ``python -m splitserve.bench.handoff_report DIR`` turns the files into a timeline.
"""

from __future__ import annotations

import time

from splitserve.trace_file import TraceFile

ENV = "SPLITSERVE_HANDOFF_TRACE"

# In the order a request normally meets them; the report lists them so.
EVENTS = (
    "router.reserve",  # the router asks the decode worker for pages (and the prefill worker to start meanwhile)
    "decode.reserved",  # the decode worker has reserved them and expects the transfer
    "router.reserved",  # ... the router has its answer
    "prefill.queued",  # the prefill worker has queued the prompt
    "prefill.pass_launched",  # its engine thread launches a pass that computes (part of) the prompt
    "prefill.transfer_begin",  # the prompt's last prefill pass, the pages known, opens its transfer
    "receiver.begin",  # the decode worker's transfer server has BEGIN
    "receiver.claimed",  # ... has set up the receive (nccl: receives posted) and claimed the pages
    "prefill.last_layer",  # the engine thread has queued the last layer's send (host time: the GPU is behind)
    "prefill.first_token",  # the prompt's first token is sampled (the GPU finished the pass)
    "router.first_token",  # ... and reached the router, which tells the decode worker to start
    "sender.end",  # the prefill worker's session takes END up
    "sender.drained",  # ... and, all its writes done (device copies, sends), puts it on the wire
    "decode.start",  # the router's start reached the decode worker
    "receiver.end",  # END reached the decode worker
    "receiver.pages_in",  # out-of-band bytes are in (nccl: the receives completed)
    "receiver.land_issued",  # ... the copy into the reserved pages is queued on the device (host time)
    "receiver.landed",  # ... and done
    "receiver.completed",  # the decode side completes the transfer (the decode worker may admit it now)
    "prefill.transfer_done",  # the prefill worker has the receiver's result
    "decode.kv_ready",  # start() saw the transfer complete
    "decode.admitted",  # the engine thread admitted the request to the batch
    "router.second_token",  # the first decoded token reached the router
)

_trace = TraceFile(ENV)


def directory() -> str | None:
    """Where this process writes its trace; None while tracing is off."""
    return _trace.directory


def mark(event: str, request_id: str) -> None:
    """Record ``event`` for ``request_id`` now (a no-op unless tracing is on)."""
    if _trace.directory is not None:
        _trace.write(f"{time.perf_counter():.6f} {event} {request_id}\n")
