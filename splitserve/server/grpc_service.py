"""The splitserve.v1.Splitserve gRPC service (grpc.aio): protobuf in, validation, cluster, protobuf out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from splitserve.cluster.messages import ServingError, Token
from splitserve.server.auth import client_key
from splitserve.server.errors import GRPC_STATUS
from splitserve.server.frontend import Frontend, Run
from splitserve.server.gen import splitserve_pb2 as pb
from splitserve.server.gen import splitserve_pb2_grpc as pb_grpc
from splitserve.server.validation import check_size, parse_completion

log = logging.getLogger(__name__)
_SCALARS = (str, bytes, int, float, bool)


class SplitserveService(pb_grpc.SplitserveServicer):
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        async with _StatusOnError(context):
            run = self._run(request)
            async with aclosing(self.frontend.stream(run, "grpc", _client(context))) as batches:
                async for batch in batches:
                    yield _response(run, batch.tokens, (batch.finish_reason or "stop") if batch.finished else None)

    async def GenerateUnary(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        async with _StatusOnError(context):
            run = self._run(request)
            tokens: list[Token] = []
            finish_reason = "abort"
            async with aclosing(self.frontend.stream(run, "grpc", _client(context))) as batches:
                async for batch in batches:
                    tokens.extend(batch.tokens)
                    if batch.finished:
                        finish_reason = batch.finish_reason or "stop"
            return _response(run, tokens, finish_reason)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        return pb.CancelResponse(cancelled=await self.frontend.cluster.cancel(request.request_id))

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        reason = self.frontend.cluster.unavailable_reason()
        if reason is not None:
            return pb.HealthResponse(serving=False, model=self.frontend.model_name, reason=reason)
        return pb.HealthResponse(
            serving=True, model=self.frontend.model_name, max_model_len=self.frontend.cluster.max_model_len
        )

    async def ClusterStatus(
        self, request: pb.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatusResponse:
        message = cluster_status_message(await self.frontend.cluster.status())
        rates = self.frontend.metrics.rates
        message.requests_per_s, message.tokens_per_s = rates.rates()
        message.rate_window_s = rates.window_s
        return message

    async def Scale(self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext) -> pb.ScaleResponse:
        async with _StatusOnError(context):
            cluster = self.frontend.cluster
            if not request.rebalance:
                result = await cluster.scale(request.role, request.replicas)
                return pb.ScaleResponse(added=result.added, removed=result.removed, message=str(result))
            move, steps = await cluster.rebalance()
            if move is None:
                return pb.ScaleResponse(message="no sustained imbalance between the phases: nothing moved")
            return pb.ScaleResponse(
                added=[w for s in steps for w in s.added],
                removed=[w for s in steps for w in s.removed],
                message=f"moved one worker {move.source} → {move.target}: " + "; ".join(map(str, steps)),
            )

    def _run(self, request: pb.GenerateRequest) -> Run:
        ctx = self.frontend.validation_context()
        check_size(request.ByteSize(), ctx.max_request_bytes)
        return Run(parse_completion(request_fields(request), ctx).generate)


def request_fields(message: pb.GenerateRequest) -> dict[str, Any]:
    """The fields the client set, as the dict validation takes (unset optional fields stay absent)."""
    return {f.name: v if isinstance(v, _SCALARS) else list(v) for f, v in message.ListFields()}


def cluster_status_message(status: dict[str, Any]) -> pb.ClusterStatusResponse:
    workers = [
        pb.WorkerStatus(
            worker_id=w["worker_id"],
            role=w["role"],
            healthy=w.get("healthy", False),
            restarts=w.get("restarts", 0),
            device=w.get("device") or "",
            queued_requests=w.get("queued_requests", 0),
            active_requests=w.get("active_requests", 0),
            pending_prefill_tokens=w.get("pending_prefill_tokens", 0),
            kv_blocks_total=w.get("kv_blocks_total", 0),
            kv_blocks_free=w.get("kv_blocks_free", 0),
            batch_size=w.get("batch_size", 0),
            draining=w.get("draining", False),
            tensor_parallel_size=w.get("tensor_parallel_size", 1),
            gpus=w.get("gpus", 0.0),
            prefix_cache_lookup_blocks=w.get("prefix_cache_lookup_blocks", 0),
            prefix_cache_hit_blocks=w.get("prefix_cache_hit_blocks", 0),
        )
        for w in status.get("workers", [])
    ]
    loads = [
        pb.RouterLoad(
            worker_id=worker_id,
            healthy=bool(load.pop("healthy", 1.0)),
            draining=bool(load.pop("draining", 0.0)),
            **load,
        )
        for worker_id, load in ((k, dict(v)) for k, v in status.get("router", {}).items())
    ]
    return pb.ClusterStatusResponse(
        mode=status.get("mode", ""),
        model=status.get("model", ""),
        inflight=status.get("inflight", 0),
        draining=status.get("draining", False),
        workers=workers,
        router_loads=loads,
        kv_blocks_total=sum(w.kv_blocks_total for w in workers),
        kv_blocks_free=sum(w.kv_blocks_free for w in workers),
    )


def _response(run: Run, tokens: list[Token], finish_reason: str | None) -> pb.GenerateResponse:
    message = pb.GenerateResponse(
        request_id=run.request.request_id,
        token_ids=[t.token_id for t in tokens],
        text="".join(t.text for t in tokens),
    )
    if run.request.params.logprobs:
        message.logprobs.extend(t.logprob or 0.0 for t in tokens)
    if finish_reason is not None:
        summary = run.summary
        message.finish_reason = finish_reason
        message.usage.prompt_tokens = len(run.request.prompt_token_ids)
        message.usage.completion_tokens = run.completion_tokens
        message.timing.CopyFrom(
            pb.Timing(
                ttft_ms=summary.ttft_ms or 0.0,
                tpot_ms=summary.tpot_ms or 0.0,
                e2e_ms=summary.e2e_ms,
                kv_transfer_ms=summary.kv_transfer_ms or 0.0,
                kv_exposed_ms=summary.kv_exposed_ms or 0.0,
                cached_prompt_tokens=summary.cached_prompt_tokens or 0,
                kv_transfer_bytes=summary.kv_transfer_bytes or 0,
                prefill_worker=summary.prefill_worker or "",
                decode_worker=summary.decode_worker or "",
                retries=summary.retries,
            )
        )
    return message


def _client(context: grpc.aio.ServicerContext) -> str:
    metadata = dict(context.invocation_metadata() or ())
    peer_host = context.peer().rsplit(":", 1)[0]  # "ipv4:127.0.0.1:5555": the port changes per connection
    return client_key(metadata.get("authorization"), peer_host)


class _StatusOnError:
    """ServingError → its gRPC status; anything unexpected → INTERNAL (details stay in the server log).

    A class rather than @asynccontextmanager so that mypy sees it never swallows an exception.
    """

    def __init__(self, context: grpc.aio.ServicerContext):
        self.context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, ServingError):
            await self.context.abort(GRPC_STATUS[exc.code], exc.message)
        if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
            log.exception("gRPC request failed", exc_info=exc)
            await self.context.abort(grpc.StatusCode.INTERNAL, "internal error (the server log has the details)")
