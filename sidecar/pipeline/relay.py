"""Forwarding one request to its upstream and relaying the answer.

The request body is read whole (bounded by the route's limit) so it can be
validated and replayed; the response is relayed as the model writes it, except that
a small response with a known length is read in one piece, which is cheaper.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Final

import structlog

from sidecar.http import errors
from sidecar.http.client import READ_AHEAD, BrokenAnswer, ClientResponse
from sidecar.http.messages import HOP_BY_HOP, Answer, Headers, Response
from sidecar.http.server import ClientGone, Request, RequestRefused
from sidecar.pipeline.context import RequestContext
from sidecar.telemetry.metrics import (
    OUTCOME_ABORTED,
    OUTCOME_CLIENT_CLOSED,
)
from sidecar.upstream.upstreams import UpstreamClient

log: Final = structlog.get_logger("sidecar.pipeline.relay")

# Set by the sidecar itself towards the upstream (or meaningless once the body is
# buffered, like Expect), so the client's copies are not forwarded. The request id
# header is the upstream's to set (its name and form are configured per upstream).
_REPLACED_UPSTREAM: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-request-id",
        b"traceparent",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)
# Headers of the sidecar's own (X-Sidecar-Shadow, X-Sidecar-Timeout-Ms, ...): a
# client's copies never reach a model, which would take them for ours.
_OWN_PREFIX: Final = b"x-sidecar-"
# X-Forwarded-For is rebuilt with the client's address appended.
_DROP_FROM_REQUEST: Final = HOP_BY_HOP | _REPLACED_UPSTREAM | {b"x-forwarded-for"}

# Answers up to this size with a Content-Length are read in one piece; larger ones,
# chunked ones and event streams are relayed chunk by chunk as they arrive. (Up to
# the client's read-ahead: a body that size arrives whole without pausing it.)
BUFFER_RESPONSE_LIMIT: Final = READ_AHEAD


# The value of nearly every kept-alive message's Connection field: it lists a field
# that is dropped anyway. ("close" is not here: a field named Close would be listed.)
_ALREADY_HOP_BY_HOP: Final = frozenset({b"keep-alive", b"Keep-Alive"})


def _connection_listed(headers: Headers) -> frozenset[bytes]:
    """Header names a sender listed in Connection: hop-by-hop for that message only."""
    value = headers.get_raw(b"connection")
    if value is None:
        return frozenset()
    if value in _ALREADY_HOP_BY_HOP and headers.count(b"connection") == 1:
        return frozenset()  # it lists only what is always dropped
    values = headers.getall("Connection")
    if len(values) == 1:
        return _listed(values[0])  # "keep-alive" or "close", nearly always
    return frozenset().union(*(_listed(value) for value in values))


@functools.lru_cache(maxsize=64)
def _listed(value: str) -> frozenset[bytes]:
    # Not field_key: its cache is for names from code and config, not a client's.
    tokens = (token.strip() for token in value.split(","))
    return frozenset(token.encode("latin-1", "replace").lower() for token in tokens if token)


@functools.lru_cache(maxsize=16)
def _request_drops(credentials: frozenset[bytes]) -> frozenset[bytes]:
    """What never goes upstream: computed once per route's credential headers, not
    per request."""
    return _DROP_FROM_REQUEST | credentials


def upstream_request_headers(
    request: Request, ctx: RequestContext, credentials: frozenset[bytes] = frozenset()
) -> Headers:
    """The client's headers for any model: hop-by-hop ones, the sidecar credential
    (``credentials``, lower-case names) and X-Sidecar-* dropped; trace and forwarding
    ones added. What belongs to one upstream (its own headers, the request id in its
    form, the deadline) is added by that upstream when it sends."""
    incoming = request.headers
    out = incoming.without(
        _request_drops(credentials), _connection_listed(incoming), prefix=_OWN_PREFIX
    )
    peer = request.peer.encode("latin-1")
    earlier = incoming.get_raw(b"x-forwarded-for")
    out.add_raw(b"x-forwarded-for", b"X-Forwarded-For", earlier + b", " + peer if earlier else peer)
    out.add_raw(b"x-forwarded-proto", b"X-Forwarded-Proto", b"http")
    host = incoming.get_raw(b"host")
    if host:
        out.add_raw(b"x-forwarded-host", b"X-Forwarded-Host", host)
    out.add_raw(b"traceparent", b"traceparent", ctx.traceparent.encode("latin-1"))
    return out


def client_response_headers(upstream_headers: Headers) -> Headers:
    """The model's header fields for the client. The server drops hop-by-hop fields
    and writes the framing of every answer itself, so only the fields the model
    listed in Connection are left out here; nearly always none, and the model's
    headers are handed on without a copy (so ``response.headers`` then holds what the
    client gets, stamps included)."""
    listed = _connection_listed(upstream_headers)
    return upstream_headers.without(listed) if listed else upstream_headers


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refusing it (413) as soon as it passes ``limit``, and
    (408) when it stalls. A declared Content-Length over the limit is refused before
    a byte of the body is read; the connection is then closed rather than drained."""
    if not request.body_exists:
        return b""
    try:
        return await request.read_body(limit)
    except RequestRefused as refusal:
        raise errors.from_refusal(refusal) from None


async def _next_chunk(response: ClientResponse, upstream: UpstreamClient, idle: float) -> bytes:
    """The next part of the answer; ``UpstreamTimeout`` after ``idle`` seconds of
    silence, ``UpstreamError`` when the upstream breaks the answer off."""
    try:
        return await response.read_chunk(idle)
    except TimeoutError:
        raise errors.UpstreamTimeout(
            f"upstream {upstream.name!r} went silent for {idle:g}s in the middle of its answer"
        ) from None
    except BrokenAnswer:
        raise errors.UpstreamError(f"upstream {upstream.name!r} broke off its answer") from None


async def read_whole(response: ClientResponse, upstream: UpstreamClient, idle: float) -> bytes:
    chunks: list[bytes] = []
    while chunk := await _next_chunk(response, upstream, idle):
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def relay(
    request: Request,
    ctx: RequestContext,
    upstream: UpstreamClient,
    response: ClientResponse,
    idle: float,
) -> Answer:
    """Relay an upstream response to the client; the model's own errors pass untouched.

    ``idle`` bounds the silence between two parts of the answer (the time to its
    first byte was bounded when it was sent). The caller releases ``response``.
    """
    ctx.answered_by = "model"
    headers = client_response_headers(response.headers)
    length = response.content_length
    # Small answers go in one write with a Content-Length: those that declare one,
    # and chunked ones that had already arrived whole with their head (common for
    # JSON from servers that always chunk), which saves the client two more writes.
    whole = (length is not None and length <= BUFFER_RESPONSE_LIMIT) or (
        length is None and response.complete
    )
    streaming = not whole or response.event_stream or request.method == "HEAD"
    if not streaming:
        if response.complete:
            body = response.take_whole()  # it came with its head
        else:
            body = await read_whole(response, upstream, idle)
        ctx.finish_upstream()
        ctx.bytes_out = len(body)
        # The pipeline stamps X-Request-ID and Server-Timing on it.
        return Response(response.status, body, headers, reason=response.reason)

    ctx.finish_upstream()
    ctx.stamp(headers)
    out = await request.stream(
        response.status,
        response.reason,
        headers,
        length if length is not None or request.method == "HEAD" else None,
    )
    if request.method == "HEAD":
        await out.end()
        return out.answer
    capture = ctx.capture
    while True:
        try:
            chunk = await _next_chunk(response, upstream, idle)
        except errors.SidecarError as exc:
            # Bytes already reached the client: no error answer is possible. Closing the
            # connection without the final chunk tells the client the answer is cut short.
            ctx.ending = OUTCOME_ABORTED
            log.warning("upstream_aborted_stream", upstream=upstream.name, error=exc.message)
            response.close()
            out.abort()
            return out.answer
        if not chunk:
            break
        try:
            await out.write(chunk)
        except ClientGone:
            # The client went away mid-stream (or stopped reading): stop reading from
            # the model, whose connection cannot be reused.
            ctx.ending = OUTCOME_CLIENT_CLOSED
            log.info("client_closed_stream", upstream=upstream.name, bytes_out=ctx.bytes_out)
            response.close()
            return out.answer
        ctx.bytes_out += len(chunk)
        if capture is not None:
            capture.add(chunk)
    # The whole answer was written; a client may close before the last chunk marker
    # (the openai client does, right after "data: [DONE]"): the answer is complete.
    with contextlib.suppress(ClientGone):
        await out.end()
    return out.answer
