"""Forwarding one request to its upstream and relaying the answer.

The request body is read whole (bounded by the route's limit) so it can be
validated and replayed; the response is relayed as the model writes it, except that
a small response with a known length is read in one piece, which is cheaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import errors
from sidecar.context import RequestContext
from sidecar.metrics import (
    OUTCOME_ABORTED,
    OUTCOME_CLIENT_CLOSED,
    OUTCOME_MODEL_ERROR,
    OUTCOME_OK,
)
from sidecar.upstreams import UpstreamClient, upstream_failure

log = structlog.get_logger("sidecar.proxy")

# RFC 9110 section 7.6.1, plus the proxy-only and legacy ones proxies drop too.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Set by the sidecar itself towards the upstream (or meaningless once the body is
# buffered, like Expect), so the client's copies are not forwarded. The request id
# header is the upstream's to set (its name and form are configured per upstream).
_REPLACED_UPSTREAM = frozenset(
    {
        "host",
        "content-length",
        "expect",
        "x-request-id",
        "traceparent",
        "x-forwarded-proto",
        "x-forwarded-host",
    }
)
# Headers of the sidecar's own (X-Sidecar-Shadow, X-Sidecar-Timeout-Ms, ...): a
# client's copies never reach a model, which would take them for ours.
_OWN_PREFIX = "x-sidecar-"
_DROP_FROM_REQUEST = HOP_BY_HOP | _REPLACED_UPSTREAM
# aiohttp computes these for the response it writes.
_DROP_FROM_RESPONSE = HOP_BY_HOP | {"content-length"}

# Answers up to this size with a Content-Length are read in one piece; larger ones,
# chunked ones and event streams are relayed chunk by chunk as they arrive.
BUFFER_RESPONSE_LIMIT = 256 * 1024
# aiohttp writes larger request bodies more gently from a stream than from bytes.
_INLINE_BODY_LIMIT = 1024 * 1024


def _connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names a sender listed in Connection: hop-by-hop for that message only."""
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


def upstream_request_headers(
    request: web.Request, ctx: RequestContext, credentials: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """The client's headers for any model: hop-by-hop ones, the sidecar credential
    (``credentials``, lower-case names) and X-Sidecar-* dropped; trace and forwarding
    ones added. What belongs to one upstream (its own headers, the request id in its
    form, the deadline) is added by that upstream when it sends."""
    incoming = request.headers
    listed = _connection_listed(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if (
            lower in _DROP_FROM_REQUEST
            or lower in listed
            or lower in credentials
            or lower == "x-forwarded-for"
            or lower.startswith(_OWN_PREFIX)
        ):
            continue
        out.add(name, value)
    peer = request.remote or ""
    earlier = incoming.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{earlier}, {peer}" if earlier else peer
    out["X-Forwarded-Proto"] = request.scheme
    if request.host:
        out["X-Forwarded-Host"] = request.host
    out["traceparent"] = ctx.traceparent
    return out


def client_response_headers(upstream_headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    listed = _connection_listed(upstream_headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream_headers.items():
        lower = name.lower()
        if lower in _DROP_FROM_RESPONSE or lower in listed:
            continue
        out.add(name, value)
    return out


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refusing it (413) as soon as it passes ``limit``.

    A declared Content-Length over the limit is refused before a byte of the body is
    read; the connection is then closed rather than drained.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise errors.BodyTooLarge(
            f"request body of {declared} bytes exceeds the limit of {limit} bytes",
            close_connection=True,
        )
    if not request.body_exists:
        return b""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise errors.BodyTooLarge(
                f"request body exceeds the limit of {limit} bytes", close_connection=True
            )
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@dataclass(slots=True)
class UpstreamCall:
    """What is sent upstream; kept whole so a retry, a shadow copy or a fallback can
    replay it to whichever upstream sends it."""

    method: str
    target: str  # the raw path and query, exactly as the client sent them
    headers: CIMultiDict[str]  # the client's, for any upstream
    body: bytes | None
    request_id: str = ""  # the id the client sees

    def payload(self) -> bytes | io.BytesIO | None:
        """The body for one attempt; large bodies go as a stream aiohttp writes in parts."""
        if self.body is not None and len(self.body) > _INLINE_BODY_LIMIT:
            return io.BytesIO(self.body)  # shares the buffer: no copy
        return self.body


async def send(
    upstream: UpstreamClient,
    call: UpstreamCall,
    *,
    within: float,
    client_timeout: aiohttp.ClientTimeout | None = None,
) -> aiohttp.ClientResponse:
    """Send one attempt and return once response headers have arrived, ``within`` seconds.

    The caller owns the returned response and must release it. Raises
    ``UpstreamTimeout`` or ``UpstreamError`` (``retryable`` when a retry may cure it).
    """
    try:
        async with asyncio.timeout(within):
            return await upstream.session.request(
                call.method,
                upstream.url_for(call.target),
                headers=upstream.headers_for(call, within),
                data=call.payload(),
                allow_redirects=False,
                timeout=client_timeout or upstream.session.timeout,
            )
    except TimeoutError:
        raise errors.UpstreamTimeout(
            f"upstream {upstream.name!r} did not start answering within {within:g}s",
            retryable=True,
        ) from None
    except aiohttp.ClientError as exc:
        raise upstream_failure(upstream.name, exc) from None


async def _next_chunk(
    response: aiohttp.ClientResponse, upstream: UpstreamClient, idle: float
) -> bytes:
    """The next part of the answer; ``UpstreamTimeout`` after ``idle`` seconds of
    silence, ``UpstreamError`` when the upstream breaks the answer off."""
    try:
        async with asyncio.timeout(idle):
            return await response.content.readany()
    except TimeoutError:
        raise errors.UpstreamTimeout(
            f"upstream {upstream.name!r} went silent for {idle:g}s in the middle of its answer"
        ) from None
    except aiohttp.ClientError as exc:
        raise upstream_failure(upstream.name, exc) from None


async def _read_whole(
    response: aiohttp.ClientResponse, upstream: UpstreamClient, idle: float
) -> bytes:
    chunks: list[bytes] = []
    while chunk := await _next_chunk(response, upstream, idle):
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def relay(
    request: web.Request,
    ctx: RequestContext,
    upstream: UpstreamClient,
    response: aiohttp.ClientResponse,
    idle: float,
) -> web.StreamResponse:
    """Relay an upstream response to the client; the model's own errors pass untouched.

    ``idle`` bounds the silence between two parts of the answer (the time to its
    first byte was bounded when it was sent).
    """
    ctx.outcome = OUTCOME_MODEL_ERROR if response.status >= 500 else OUTCOME_OK
    headers = client_response_headers(response.headers)
    length = response.content_length
    # Small answers go in one write with a Content-Length: those that declare one,
    # and chunked ones that had already arrived whole with their headers (common for
    # JSON from servers that always chunk), which saves the client two more writes.
    whole = (length is not None and length <= BUFFER_RESPONSE_LIMIT) or (
        length is None and response.content.is_eof()
    )
    streaming = (
        not whole or response.content_type == "text/event-stream" or request.method == "HEAD"
    )
    if not streaming:
        body = await _read_whole(response, upstream, idle)
        ctx.finish_upstream()
        ctx.bytes_out = len(body)
        # The identity middleware stamps X-Request-ID and Server-Timing on it.
        return web.Response(
            status=response.status, reason=response.reason, headers=headers, body=body
        )

    ctx.finish_upstream()
    out = web.StreamResponse(status=response.status, reason=response.reason, headers=headers)
    if length is not None:
        out.content_length = length
    ctx.stamp(out.headers)
    await out.prepare(request)
    if request.method == "HEAD":
        return out
    capture = ctx.capture
    while True:
        try:
            chunk = await _next_chunk(response, upstream, idle)
        except errors.SidecarError as exc:
            # Bytes already reached the client: no error answer is possible. Closing the
            # connection without the final chunk tells the client the answer is cut short.
            ctx.outcome = OUTCOME_ABORTED
            log.warning("upstream_aborted_stream", upstream=upstream.name, error=exc.message)
            response.close()
            if request.transport is not None:
                request.transport.close()
            return out
        if not chunk:
            break
        try:
            await out.write(chunk)
        except ConnectionError:
            # The client went away mid-stream: stop reading from the model.
            ctx.outcome = OUTCOME_CLIENT_CLOSED
            log.info("client_closed_stream", upstream=upstream.name, bytes_out=ctx.bytes_out)
            response.close()
            return out
        ctx.bytes_out += len(chunk)
        if capture is not None:
            capture.add(chunk)
    # The whole answer was written; a client may close before the last chunk marker
    # (the openai client does, right after "data: [DONE]"): the answer is complete.
    with contextlib.suppress(ConnectionError):
        await out.write_eof()
    return out
