"""The admin listener (aiohttp), whose HTTP-level refusals are JSON too.

aiohttp's parser (llhttp) already refuses request smuggling shapes: Content-Length
with Transfer-Encoding, duplicate Content-Length, obsolete line folding, bad header
characters, overlong lines. But it answers them itself, before any middleware, as
plain text that echoes the offending bytes in a Python ``b'...'`` repr. This module
makes those answers the same JSON error body as every other refusal, without
echoing the input.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from sidecar.http import errors
from sidecar.http.messages import Response
from sidecar.pipeline.identity import new_request_id

log = structlog.get_logger("sidecar.control.listener")

_SAFE_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 ,.'()-]{0,100}")


def _public_reason(exc: BaseException | None) -> str:
    """llhttp's own description of the problem, never the client's bytes."""
    if isinstance(exc, LineTooLong):
        return "request line or header field too long"
    if isinstance(exc, HttpProcessingError):
        text = str(exc.message).split("\n", 1)[0].split(": b'", 1)[0].rstrip(":")
        match = _SAFE_REASON.fullmatch(text.strip())
        if match:
            return f"malformed HTTP request: {match.group(0)}"
    return "malformed HTTP request"


def to_aiohttp(answer: Response) -> web.Response:
    """One of our answers, for the admin listener's aiohttp server."""
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers.items())


class JsonErrorRequestHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        request_id = new_request_id()
        error: errors.SidecarError
        if status == HTTPStatus.INTERNAL_SERVER_ERROR:
            log.error("http_layer_error", request_id=request_id, exc_info=exc)
            error = errors.InternalError("the sidecar failed to handle this request")
        elif isinstance(exc, LineTooLong):
            error = errors.HeaderTooLarge(_public_reason(exc))
        else:
            error = errors.BadRequest(_public_reason(exc))
        response = to_aiohttp(errors.error_response(error, request_id))
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class SidecarRunner(web.AppRunner):
    """An AppRunner whose connections answer parser-level errors with JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no setting for the per-connection protocol class; the server
        # it built is re-classed to one that creates ours (same state, no new fields).
        server.__class__ = JsonErrorServer
        return server
