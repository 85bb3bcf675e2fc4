"""Error bodies of the HTTP API, in OpenAI's shape so OpenAI clients raise their usual exceptions."""

from __future__ import annotations

from aiohttp import web

from splitserve.cluster.messages import ServingError
from splitserve.server.errors import HTTP_STATUS


def error_response(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": code, "code": code, "param": None}}, status=status)


def serving_error_response(err: ServingError) -> web.Response:
    return error_response(HTTP_STATUS[err.code], err.message, err.code.value)
