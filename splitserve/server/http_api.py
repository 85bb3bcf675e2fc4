"""The OpenAI-compatible HTTP API (aiohttp): completions and chat (SSE or whole), models, health, metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from splitserve.cluster.messages import ServingError, Token, TokenBatch
from splitserve.server.auth import client_key, http_auth_middleware
from splitserve.server.frontend import Frontend, Run
from splitserve.server.http_errors import serving_error_response
from splitserve.server.openai_format import OpenAIFormat, timing, usage
from splitserve.server.validation import (
    ApiRequest,
    ValidationContext,
    check_size,
    parse_chat,
    parse_completion,
    parse_json,
)

log = logging.getLogger(__name__)
Parser = Callable[[Any, ValidationContext, str | None], ApiRequest]
# The conversation a request continues, for clients that cannot set a body field (docs/api.md); it wins over the
# body's session_id and user.
SESSION_HEADER = "x-session-id"


def create_app(frontend: Frontend, auth_token: str | None) -> web.Application:
    middlewares = [http_auth_middleware(auth_token)] if auth_token else []
    app = web.Application(middlewares=middlewares, client_max_size=frontend.server.max_request_bytes)
    api = HttpApi(frontend)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.metrics)
    return app


class HttpApi:
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion, OpenAIFormat(chat=False))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat, OpenAIFormat(chat=True))

    async def models(self, request: web.Request) -> web.Response:
        try:
            max_model_len = self.frontend.cluster.max_model_len
        except ServingError as err:
            return serving_error_response(err)
        model = {
            "id": self.frontend.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "splitserve",
            "max_model_len": max_model_len,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        """200 ``ok`` while requests can be served; else 503 with ``draining`` or ``unavailable`` and the reason."""
        status = await self.frontend.cluster.status()
        reason = status.get("unavailable")
        if reason is None:
            return web.json_response({"status": "ok"})
        state = "draining" if status.get("draining", False) else "unavailable"
        return web.json_response({"status": state, "reason": reason}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.frontend.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _generate(self, request: web.Request, parse: Parser, fmt: OpenAIFormat) -> web.StreamResponse:
        try:
            session = request.headers.get(SESSION_HEADER)
            api_request = parse(await self._body(request), self.frontend.validation_context(), session)
            run = Run(api_request.generate)
            client = client_key(request.headers.get("Authorization"), request.remote or "")
            async with aclosing(self.frontend.stream(run, "http", client)) as batches:
                if api_request.stream:
                    return await self._stream(request, run, batches, fmt, api_request.include_usage)
                return await self._whole(run, batches, fmt)
        except ServingError as err:
            return serving_error_response(err)

    async def _body(self, request: web.Request) -> Any:
        limit = self.frontend.server.max_request_bytes
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            check_size(request.content_length or limit + 1, limit)
            raise
        return parse_json(raw, limit)

    async def _whole(self, run: Run, batches: AsyncIterator[TokenBatch], fmt: OpenAIFormat) -> web.Response:
        tokens: list[Token] = []
        finish_reason = "abort"
        async for batch in batches:
            tokens.extend(batch.tokens)
            if batch.finished:
                finish_reason = batch.finish_reason or "stop"
        body = fmt.envelope(run, self.frontend.model_name, [fmt.choice(run, tokens, finish_reason, chunk=False)], False)
        body["usage"] = usage(run)
        body["timing"] = timing(run)
        return web.json_response(body)

    async def _stream(
        self,
        request: web.Request,
        run: Run,
        batches: AsyncIterator[TokenBatch],
        fmt: OpenAIFormat,
        include_usage: bool,
    ) -> web.StreamResponse:
        """Server-sent events. Headers go out with the first batch, so errors before it get a real status code."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            async for batch in batches:
                if not response.prepared:
                    await response.prepare(request)
                finish_reason = (batch.finish_reason or "stop") if batch.finished else None
                chunk = fmt.envelope(
                    run, self.frontend.model_name, [fmt.choice(run, batch.tokens, finish_reason, True)], True
                )
                if batch.finished:
                    chunk["timing"] = timing(run)
                await _send(response, chunk)
            if not response.prepared:  # a stream that ended without a batch still gets its [DONE]
                await response.prepare(request)
            if include_usage:
                await _send(response, {**fmt.envelope(run, self.frontend.model_name, [], True), "usage": usage(run)})
        except ServingError as err:
            if not response.prepared:
                raise
            await _send(response, {"error": {"message": err.message, "type": err.code.value, "code": err.code.value}})
        except ConnectionResetError:
            log.info("%s: client went away mid-stream; request cancelled", run.request.request_id)
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())
