"""The sidecar's HTTP/1.1 server: an asyncio protocol per connection, llhttp to parse.

A connection handles one request at a time; pipelined requests wait, in the order
they came, with reading paused. One task answers a connection's requests, and waits
for the next until the sweeper's next tick (at most 256 tasks wait): a busy
kept-alive client is served without a task made per request, an idle one holds none.
What one client can hold is bounded in bytes and time: the head (request line, each
field, the whole head, the field count), the time to send a head, the silence
between two parts of a body, the body read ahead of the handler (reading pauses
past ``read_ahead``), the idle time between requests, and how long a write may wait
for a client that stopped reading.

Refusals before a request reaches the handler (malformed or oversized heads,
timeouts, unsupported versions) are answered through ``refuse``, which the layer
above provides: it shapes the error body and counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import unquote

import httptools
import structlog
from mypy_extensions import mypyc_attr

from sidecar.http.messages import (
    HOP_BY_HOP,
    Answer,
    Headers,
    RawField,
    Response,
    StreamedAnswer,
    http_date,
    lower_key,
    media_type,
    parsed_version,
    status_has_body,
    status_line,
)
from sidecar.http.transport import FlowControlled, as_protocol

log: Final = structlog.get_logger("sidecar.http.server")

# Framing and connection management are ours to write: a handler's copies of
# these (a relayed model's among them) are never sent.
_FRAMING: Final = HOP_BY_HOP | {b"content-length"}
_SAFE_REASON: Final = re.compile(r"[A-Za-z][A-Za-z0-9 ,.'()-]{0,100}")
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# SO_LINGER on, 0 seconds: closing sends a reset (RST), not a clean end (FIN).
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class Limits:
    max_line: int = 8 * 1024  # the request target, and each header field
    max_head: int = 32 * 1024  # request line and every field together
    max_headers: int = 100
    head_timeout: float = 10.0  # from a head's first byte to its end
    body_timeout: float = 30.0  # silence between two parts of a body
    body_min_rate: int = 500  # bytes a second a body must average past body_timeout (0: off)
    idle_timeout: float = 75.0  # keep-alive: a connection waiting for its next request
    send_timeout: float = 30.0  # a write waiting for a client that stopped reading
    read_ahead: int = 256 * 1024  # body bytes buffered before the handler reads them
    buffered_bodies: int = 64 * 1024 * 1024  # body bytes held by all requests together
    buffered_heads: int = 8 * 1024 * 1024  # bytes of unfinished heads, all connections
    write_buffer: int = 64 * 1024  # bytes queued to a client before writes wait
    max_pipelined: int = 32  # parsed requests waiting behind the one being handled
    linger: float = 5.0  # reading on after an answer that left the client's bytes unread


class RequestRefused(Exception):
    """The HTTP layer refuses a request (or its body): status, type and a message
    that never echoes the client's bytes. The connection closes after the answer."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@mypyc_attr(native_class=False)  # compiled, a class may not extend ConnectionError
class ClientGone(ConnectionError):
    """The client closed the connection, or stopped reading for ``send_timeout``."""


Handler = Callable[["Request"], Awaitable[Answer]]
# (refusal, method, target, peer) -> the answer; also counts and logs it.
Refuse = Callable[[RequestRefused, str, str, str], Response]


class Request:
    """One request: its head parsed once, its body read on demand (``read_body``)."""

    __slots__ = (
        "_charged",
        "_conn",
        "_continue_sent",
        "_error",
        "_parts",
        "_path",
        "_size",
        "_waiter",
        "answer_finished",
        "answer_started",
        "answer_status",
        "body_exists",
        "complete",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "peer",
        "target",
        "version",
    )

    def __init__(
        self,
        conn: HttpConnection,
        method: str,
        target: str,
        version: str,
        headers: Headers,
        peer: str,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target  # raw: path and query exactly as the client sent them
        self.version = version
        self.headers = headers
        self.peer = peer
        self.keep_alive = keep_alive
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None else None  # llhttp checked it
        self.body_exists = (
            self.content_length is not None and self.content_length > 0
        ) or "transfer-encoding" in headers
        self.complete = False  # every byte of the body has arrived
        self.answer_started = False
        self.answer_status = 0  # of the answer sent (or begun)
        self.answer_finished = False
        self._conn = conn
        self._parts: list[bytes] = []
        self._size = 0
        self._charged = 0  # of its body's bytes, counted in the server's body_bytes
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None  # the body can no longer arrive
        self._continue_sent = False
        self._path: str | None = None

    @property
    def path(self) -> str:
        """The target's path, percent-decoded (the routing stage refused tricky forms)."""
        path = self._path
        if path is None:
            raw = self.target.split("?", 1)[0]
            path = unquote(raw) if "%" in raw else raw
            self._path = path
        return path

    @property
    def content_type(self) -> str:
        return media_type(self.headers.get("content-type")) or "application/octet-stream"

    # -- the body ------------------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        if self._error is not None:
            return  # refused, or the client left: its bytes are not kept
        size = len(chunk)
        server = self._conn.server
        if server.body_bytes + size > server.limits.buffered_bodies:
            self._refuse_for_memory()
            return
        server.body_bytes += size
        self._charged += size
        self._parts.append(chunk)
        self._size += size
        self._wake()

    def _refuse_for_memory(self) -> None:
        """The bodies held by all requests would pass the server's budget: this one
        is refused (503) and what it holds let go, so that many clients sending
        large bodies at once get an answer instead of the process being killed for
        its memory (each body is read whole before it is sent on)."""
        server = self._conn.server
        server.bodies_refused += 1
        self._parts = []
        self._release()
        self._fail(
            RequestRefused(
                503,
                "overloaded",
                "the request bodies this server holds are at their limit"
                " (server.max_buffered_bodies); retry later",
            )
        )

    def _release(self) -> None:
        """Its body's bytes no longer count in the server's budget (the request has
        ended, or was refused)."""
        charged = self._charged
        if charged:
            self._conn.server.body_bytes -= charged
            self._charged = 0

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _raise_if_failed(self) -> None:
        # A call, not an inline test: mypyc would take the attribute as narrowed to
        # None by an earlier test across the calls that set it.
        error = self._error
        if error is not None:
            raise error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arrived_body(self, limit: int) -> bytes | None:
        """The whole body when all of it has come and is within ``limit``, without a
        wait (a small body comes with its head); else None, and ``read_body`` it."""
        if not self.complete or self._size > limit or self._error is not None:
            return None
        parts = self._parts
        self._parts = []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_body(self, limit: int) -> bytes:
        """The whole body, refused (413) as soon as it passes ``limit`` bytes and
        (408) when the client goes silent in the middle of it for ``body_timeout``
        or sends it slower than ``body_min_rate`` past that time (a fast part earns
        at most ``body_timeout`` ahead)."""
        declared = self.content_length
        if declared is not None and declared > limit:
            raise RequestRefused(
                413,
                "body_too_large",
                f"request body of {declared} bytes exceeds the limit of {limit} bytes",
            )
        conn = self._conn
        if not self.complete and declared is not None:
            server = conn.server
            # Refused before the body is sent when it could not be held anyway.
            if server.body_bytes - self._charged + declared > server.limits.buffered_bodies:
                self._refuse_for_memory()
        self._raise_if_failed()
        if not self.complete:
            if (
                not self._continue_sent
                and self.version == "1.1"  # a 1.0 request's expectation is ignored
                and (self.headers.get("expect") or "").lower() == "100-continue"
            ):
                self._continue_sent = True
                conn.write_raw(_CONTINUE)
            conn.resume_reading()
        loop = conn.loop
        limits = conn.limits
        timeout = limits.body_timeout
        min_rate = limits.body_min_rate
        # Silence is timed, and so is the whole: the body may take body_timeout, and
        # a second more for each min_rate bytes, so a client trickling a byte now
        # and then cannot hold its share of the bodies' budget for ever. The time a
        # part earns is never more than body_timeout ahead of now: uncapped, a body
        # sent fast up to its last bytes earned a second a min_rate bytes (1 MiB at
        # 500B/s: 35 minutes) to trickle those in, holding the most budget longest.
        deadline = loop.time() + timeout
        had = counted = self._size
        while not self.complete:
            if self._size > limit:
                break
            self._raise_if_failed()
            wait = timeout
            slow = False  # the rate's deadline comes before the silence's
            if min_rate:
                now = loop.time()
                if self._size > counted:
                    earned = deadline + (self._size - counted) / min_rate
                    deadline = min(earned, now + timeout)
                    counted = self._size
                slow = self._size > had and deadline < now + timeout
                if slow:
                    wait = max(deadline - now, 0.0)
            waiter = loop.create_future()
            self._waiter = waiter
            timer = loop.call_later(wait, _time_out, waiter)
            try:
                await waiter
            except TimeoutError:
                raise RequestRefused(
                    408,
                    "request_timeout",
                    f"the request body arrived slower than {min_rate} bytes/s"
                    " (server.body_min_rate)"
                    if slow
                    else f"no bytes of the request body arrived for {timeout:g}s",
                ) from None
            finally:
                timer.cancel()
                self._waiter = None
        if self._size > limit:
            raise RequestRefused(
                413, "body_too_large", f"request body exceeds the limit of {limit} bytes"
            )
        self._raise_if_failed()  # it came to its end, but was refused on the way
        parts = self._parts
        self._parts = []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- the answer ----------------------------------------------------------------

    async def stream(
        self, status: int, reason: str | None, headers: Headers, length: int | None = None
    ) -> BodyWriter:
        """Send the head of an answer whose body follows in parts (``BodyWriter``)."""
        return await self._conn.start_stream(self, status, reason, headers, length)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class BodyWriter:
    """The body of a streamed answer: chunked to HTTP/1.1 clients unless its length
    was declared; ``write`` waits (up to ``send_timeout``) while the client's buffer
    is full, so a slow reader holds a few kilobytes, not the whole answer."""

    __slots__ = ("_conn", "_request", "answer", "chunked", "length", "sends_body", "written")

    def __init__(
        self,
        conn: HttpConnection,
        request: Request,
        answer: StreamedAnswer,
        chunked: bool,
        length: int | None,
        sends_body: bool,
    ) -> None:
        self._conn = conn
        self._request = request
        self.answer = answer
        self.chunked = chunked
        self.length = length  # declared, or None
        self.sends_body = sends_body
        self.written = 0

    async def write(self, chunk: bytes) -> None:
        if not chunk or not self.sends_body:
            return
        conn = self._conn
        if conn.closed:
            raise ClientGone("the client closed the connection")
        if self.chunked:
            conn.transport_writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            conn.write_raw(chunk)
        self.written += len(chunk)
        await conn.drain()

    async def end(self) -> None:
        """The answer is complete. An answer shorter than its declared length cannot
        be ended: the connection is closed instead, so the client sees it cut."""
        request = self._request
        if request.answer_finished:
            return
        request.answer_finished = True
        conn = self._conn
        if self.chunked and self.sends_body and not conn.closed:
            conn.write_raw(b"0\r\n\r\n")
        if self.length is not None and self.sends_body and self.written < self.length:
            conn.abort()
            return
        await conn.drain()
        conn._reset_if_cut = False  # every byte of a close-delimited answer went out

    def abort(self) -> None:
        """Cut the answer off: the client sees it end without its final part."""
        self._request.answer_finished = True
        self._conn.abort()


class HttpConnection(FlowControlled):
    """One client connection."""

    # Thousands of idle keep-alive connections: no per-instance dict.
    __slots__ = (
        "_body_fed",
        "_close_after_answer",
        "_current",
        "_drain_waiter",
        "_head_began",
        "_head_bytes",
        "_head_held",
        "_in_head",
        "_lingering",
        "_next",
        "_parser",
        "_parsing",
        "_partial",
        "_pending_refusal",
        "_queue",
        "_raw_headers",
        "_refusal",
        "_reset_if_cut",
        "_task",
        "_url",
        "_write_paused",
        "deadline",
        "limits",
        "loop",
        "on_deadline",
        "peer",
        "server",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport = None  # declared by FlowControlled: see its comment
        self.peer = ""
        self.closed = False
        self._queue: deque[Request] | None = None  # pipelined requests (made when needed)
        self._current: Request | None = None  # being handled
        self._parsing: Request | None = None  # head parsed, body still arriving
        # The task that answers this connection's requests in order; between requests
        # it waits on ``_next`` for the next one, until the sweeper's next tick.
        self._task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[Request | None] | None = None
        # One deadline at a time (head, idle), checked by the server's sweeper: no
        # timer is created or cancelled per request.
        self.deadline = 0.0
        self.on_deadline: Callable[[], None] | None = None
        self._url = b""
        self._raw_headers: list[RawField] = []
        self._head_bytes = 0  # the request line and the complete fields of a head
        self._head_held = 0  # of an unfinished head's bytes, counted in the server's
        self._partial = 0  # at most this many bytes of an unfinished line are held
        self._head_began = False  # a head began in the read being parsed
        self._body_fed = False  # body bytes came in the read being parsed
        self._in_head = False
        self._refusal: RequestRefused | None = None  # found by a parser callback
        self._pending_refusal: RequestRefused | None = None  # answered after the current
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._close_after_answer = False
        self._lingering = False  # our side is closed; the client's bytes are discarded
        # A close-delimited answer (to an HTTP/1.0 client) is under way: its client
        # takes a clean close for its end, so cutting it short must reset instead.
        self._reset_if_cut = False

    # -- transport events ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but act as one.
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        # uvloop sets TCP_NODELAY on TCP transports already.
        transport.set_write_buffer_limits(high=self.limits.write_buffer)
        self.server.connections.add(self)
        self._arm(self.limits.idle_timeout, self._idle_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        server = self.server
        server.head_bytes -= self._head_held
        self._head_held = 0
        server.connections.discard(self)
        if server.draining and not server.connections:
            server._drained.set()
        self._disarm()
        gone = ClientGone("the client closed the connection")
        for request in (self._current, self._parsing, *(self._queue or ())):
            if request is not None:
                request._fail(gone)
                request._release()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)
        task = self._task
        if task is not None and not task.done():
            # Nobody reads the answer: stop the work for it (the upstream call too).
            task.cancel()

    def eof_received(self) -> bool:
        # The client closed its side: like NGINX, take it as gone (its request's work
        # is cancelled), whether or not it still reads (a half-close is rare in HTTP).
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed or self._pending_refusal is not None or self._lingering:
            return
        self._head_began = self._body_fed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrades (and CONNECT) are not ours to make: answer what was asked,
            # never switch protocols, and close after the answer.
            self._close_after_answer = True
            self.pause_reading()
        except httptools.HttpParserCallbackError:
            refusal = self._refusal or RequestRefused(400, "bad_request", "malformed HTTP request")
            self._refuse(refusal)
        except httptools.HttpParserError as exc:
            self._refuse(RequestRefused(400, "bad_request", _public_reason(exc)))
        else:
            if self._in_head or self._parsing is not None:
                # llhttp keeps an unfinished field (of a head or of the trailers after
                # a chunked body) until it ends: bound what it holds. Lines end in LF,
                # so the unfinished one is at most what follows the last LF of this
                # read (all of it when there is none). A read in which a head began
                # or body bytes came is not counted: its bytes before the line are
                # another request's, or body, and one read is bounded by the transport.
                if self._head_began or self._body_fed:
                    self._partial = 0
                else:
                    newline = data.rfind(b"\n")
                    if newline >= 0:
                        self._partial = len(data) - newline - 1
                    else:
                        self._partial += len(data)
                if self._partial > self.limits.max_line:
                    self._refuse(_head_too_large("a header field"))
                    return
            if self._in_head:
                # Every byte read since the head began (the parser holds its last
                # field until the next begins; the read it began in may hold the end
                # of the request before it), at most what a head may hold.
                held = len(data) if self._head_began else self._head_held + len(data)
                limits = self.limits
                self._hold_head(min(held, limits.max_head + limits.max_line))
            elif self._head_held:
                self._hold_head(0)

    def _hold_head(self, held: int) -> None:
        """Count what this connection's unfinished head holds in the server's total:
        heads may take ``max_head`` each for ``head_timeout``, and thousands of
        connections sending fat heads slowly would otherwise hold more memory than
        the process has. Past the server's budget the head is refused (503)."""
        server = self.server
        server.head_bytes += held - self._head_held
        self._head_held = held
        if held and server.head_bytes > self.limits.buffered_heads:
            server.head_bytes -= held  # dropped with the connection
            self._head_held = 0
            server.heads_refused += 1
            self._refuse(
                RequestRefused(
                    503,
                    "overloaded",
                    "the unfinished request heads this server holds are at their limit"
                    " (server.max_buffered_heads); retry later",
                )
            )

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._raw_headers = []
        self._head_bytes = 0
        self._partial = 0
        self._head_began = True
        self._in_head = True
        if self._current is None:
            self._arm(self.limits.head_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_line:
            self._refusal = _head_too_large("the request line")
            raise self._refusal

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        size = len(name) + len(value) + 4
        self._head_bytes += size
        if size > limits.max_line:
            self._refusal = _head_too_large("a header field")
        elif len(self._raw_headers) >= limits.max_headers:
            self._refusal = _head_too_large(f"more than {limits.max_headers} header fields;")
        elif self._head_bytes + len(self._url) > limits.max_head:
            self._refusal = _head_too_large("the request head")
        if self._refusal is not None:
            raise self._refusal
        self._raw_headers.append((lower_key(name), name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._current is None:
            self._disarm()
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        version = parsed_version(parser, self._raw_headers, keep_alive)
        if version != "1.1" and version != "1.0":
            self._refusal = RequestRefused(
                505, "http_version_not_supported", f"HTTP/{version} is not served here"
            )
            raise self._refusal
        queue = self._queue
        if queue is not None and len(queue) >= self.limits.max_pipelined:
            # One read is parsed whole: without a cap, a single write of tiny requests
            # became thousands of parsed requests (about 35 times its size) held here.
            self._refusal = RequestRefused(
                400, "bad_request", f"more than {self.limits.max_pipelined} pipelined requests"
            )
            raise self._refusal
        # The fields are the request's from here: a trailer must not be added to them.
        headers = Headers(raw=self._raw_headers)
        self._raw_headers = []
        if keep_alive and version == "1.0" and "transfer-encoding" in headers:
            keep_alive = False  # faulty framing in 1.0 (RFC 9112 6.1): close after it
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            version,
            headers,
            self.peer,
            keep_alive,
        )
        self._parsing = request
        waiter = self._next
        if self._current is None and waiter is not None and not waiter.done():
            self._current = request  # the serving task waits for it: hand it over
            self._next = None
            waiter.set_result(request)
        elif self._current is None and self._task is None:
            self._start(request)
        else:
            if self._current is None:
                # Come as the wait ended, before the task ran again: the ending task
                # serves it, so it is being handled from now on (a refusal behind it,
                # a timeout and stop() wait for its answer).
                self._current = request
            if self._queue is None:
                self._queue = deque()
            self._queue.append(request)
            self.pause_reading()  # one request at a time; the next waits unread

    def on_body(self, body: bytes) -> None:
        self._body_fed = True
        request = self._parsing
        if request is None:
            return
        request._feed(body)
        if request._size > self.limits.read_ahead and request._waiter is None:
            self.pause_reading()  # the handler has not asked for it yet

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        if request is not None:
            request._finish()

    # -- handling ------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._current = request
        self._task = self.loop.create_task(self._serve(request))

    async def _serve(self, first: Request) -> None:
        """Answer the connection's requests in order. Between requests the task waits
        for the next one until the server's sweeper next runs (within a tick), so a
        busy kept-alive connection reuses it: a task made per request was a tenth of
        what a pass-through request cost. An idle connection holds no task."""
        request: Request | None = first
        try:
            while request is not None:
                try:
                    await self._handle(request)
                finally:
                    request._release()
                if self.closed or not self._reusable(request):
                    # Bytes of the client's may be left unread: its body, or what it
                    # sent after it (parsed, or refused and left unread, such as
                    # anything after a request that said Connection: close).
                    self.close(
                        linger=not request.complete
                        or bool(self._queue)
                        or self._in_head
                        or self._pending_refusal is not None
                    )
                    return
                if not self._queue:
                    self._current = request = None  # not kept while the next is awaited
                    if not self._ready_for_next():
                        return
                    server = self.server
                    if server.waiting >= MAX_WAITING_TASKS:
                        return  # the connection idles without a task, as all do after a tick
                    waiter: asyncio.Future[Request | None] = self.loop.create_future()
                    self._next = waiter
                    server.waiting += 1
                    try:
                        request = await waiter  # the next request, or None: the wait ended
                    finally:
                        server.waiting -= 1
                    if request is not None or not self._queue:
                        continue  # served, or (None) the task ends: the connection idles
                # Pipelined, or come as the wait ended (queued for this ending task).
                request = self._queue.popleft()
                self._current = request
        finally:
            self._current = None
            self._task = None
            self._next = None

    def _ready_for_next(self) -> bool:
        """Between requests: answer a refusal found meanwhile (False: the connection is
        closing), else read again and time the wait for the next head."""
        refusal = self._pending_refusal
        if refusal is not None:
            self._pending_refusal = None
            self._answer_refusal(refusal)
            return False
        self.resume_reading()
        if self._in_head:
            # The next request's head began while this one was answered: its time
            # runs from now (the idle deadline would ignore a connection in a head).
            self._arm(self.limits.head_timeout, self._head_timed_out)
        else:
            self._arm(self.limits.idle_timeout, self._idle_timed_out)
        return True

    def _end_wait(self) -> None:
        """The sweeper ends the wait for a next request: the task returns, and the
        connection waits idle without one."""
        waiter, self._next = self._next, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _handle(self, request: Request) -> None:
        try:
            answer = await self.server.handler(request)
        except ClientGone:
            self.abort()  # the client left, or an answer it had begun cannot be finished
            return
        except asyncio.CancelledError:
            if self.closed:
                return  # the client left; the handler noticed by being cancelled
            raise
        except Exception:
            # The layer above answers its own errors; this is the last guard.
            log.exception("http_handler_failed")
            if request.answer_started:
                self.abort()
                return
            answer = self.server.refuse(
                RequestRefused(500, "internal_error", "the sidecar failed to handle this request"),
                request.method,
                request.target,
                self.peer,
            )
            answer.close = True
        if self.closed:
            return
        if isinstance(answer, Response):
            if request.answer_started:
                self.abort()  # a handler that streamed must not also answer whole
                return
            self._write_whole(request, answer)
        elif not request.answer_finished:
            self.abort()  # a streamed answer left unfinished is cut, never padded
            return
        if self._write_paused:  # the next request waits until this answer has gone out
            with contextlib.suppress(ClientGone):
                await self.drain()

    def _reusable(self, request: Request) -> bool:
        return (
            request.keep_alive
            and request.complete  # an unread body cannot be skipped safely
            and not self._close_after_answer
            and not self.server.draining
        )

    def _keeps_alive(self, request: Request, close: bool) -> bool:
        if close or not self._reusable(request):
            self._close_after_answer = True
            return False
        return True

    def _head(
        self,
        request: Request,
        status: int,
        reason: str | None,
        headers: Headers,
        framing: bytes,
        keep_alive: bool,
    ) -> list[bytes]:
        """The pieces of an answer's head, for the caller to join once (a small
        body joined with them): one copy of the whole answer, not one per part."""
        parts = [status_line(status, reason, request.version == "1.0")]
        headers.render_into(parts, _FRAMING)
        if framing:
            parts.append(framing)
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif request.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        if not headers.has(b"date"):
            parts.append(http_date.now())
        parts.append(b"\r\n")
        return parts

    def _write_whole(self, request: Request, answer: Response) -> None:
        request.answer_started = request.answer_finished = True
        request.answer_status = answer.status
        keep_alive = self._keeps_alive(request, answer.close)
        body = answer.body
        status = answer.status
        framing = b"Content-Length: %d\r\n" % len(body) if status_has_body(status) else b""
        head = self._head(request, status, answer.reason, answer.headers, framing, keep_alive)
        if request.method == "HEAD" or not status_has_body(status) or not body:
            self.write_raw(b"".join(head))
        elif len(body) < 16384:
            head.append(body)
            self.write_raw(b"".join(head))  # one write, no copy worth avoiding
        else:
            self.write_raw(b"".join(head))
            self.write_raw(body)

    async def start_stream(
        self,
        request: Request,
        status: int,
        reason: str | None,
        headers: Headers,
        length: int | None,
    ) -> BodyWriter:
        if request.answer_started:
            raise RuntimeError("the answer has already started")
        request.answer_started = True
        request.answer_status = status
        sends_body = status_has_body(status) and request.method != "HEAD"
        chunked = False
        framing = b""
        close = False
        if status_has_body(status):
            if length is not None:
                framing = b"Content-Length: %d\r\n" % length
            elif request.version == "1.1":
                framing = b"Transfer-Encoding: chunked\r\n"
                chunked = sends_body
            else:
                close = True  # an HTTP/1.0 client reads to the end of the connection
        keep_alive = self._keeps_alive(request, close)
        self._reset_if_cut = close and sends_body
        self.write_raw(b"".join(self._head(request, status, reason, headers, framing, keep_alive)))
        writer = BodyWriter(
            self, request, StreamedAnswer(status, headers), chunked, length, sends_body
        )
        await self.drain()
        return writer

    # -- writing -------------------------------------------------------------------

    def write_raw(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not self.closed and not self._lingering:
            transport.write(data)

    def transport_writelines(self, parts: tuple[bytes, ...]) -> None:
        transport = self._transport
        if transport is not None and not self.closed and not self._lingering:
            transport.writelines(parts)

    async def drain(self) -> None:
        """Wait while the client's buffer is full; a client that reads nothing for
        ``send_timeout`` is cut off (``ClientGone``), its work released."""
        if self.closed:
            raise ClientGone("the client closed the connection")
        if not self._write_paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiter = waiter
        timer = self.loop.call_later(self.limits.send_timeout, _time_out, waiter)
        try:
            await waiter
        except TimeoutError:
            self.server.slow_readers += 1
            self.abort()
            raise ClientGone(f"the client read nothing for {self.limits.send_timeout:g}s") from None
        finally:
            timer.cancel()
            self._drain_waiter = None

    def close(self, *, linger: bool = False) -> None:
        """Close once what was written has gone out.

        With ``linger`` (the client may still be sending: a body we refused, requests
        after a refusal), closing with its bytes unread would reset the connection,
        and a reset destroys the answer the client has not read yet. So, like NGINX's
        lingering close, end our side only, and discard what comes for ``linger``
        seconds or until the client closes its side."""
        transport = self._transport
        if transport is None or self.closed or self._lingering:
            return
        if not linger or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        transport.write_eof()  # once what was written has gone out
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._arm(self.limits.linger, self.abort)

    def abort(self) -> None:
        """Close at once, dropping anything unsent. A close-delimited answer cut
        short is reset: its client would read a clean close as the answer's end."""
        transport = self._transport
        if transport is not None and not self.closed:
            self.closed = True
            if self._reset_if_cut:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            transport.abort()

    # -- refusals and timers -------------------------------------------------------

    def _refuse(self, refusal: RequestRefused) -> None:
        self.pause_reading()
        # The refused head's fields are let go now, not when the lingering close ends
        # (a request's own fields were handed to it whole).
        self._raw_headers = []
        if self._parsing is not None:
            # A malformed body: the handler waiting for it is told now, not after
            # body_timeout (its answer closes the connection, the body being unread).
            self._parsing._fail(refusal)
        if self._current is not None:
            self._pending_refusal = refusal  # after the answer in progress
            return
        self._answer_refusal(refusal)

    def _answer_refusal(self, refusal: RequestRefused) -> None:
        method = self._parser.get_method().decode("ascii", "replace") if self._url else "-"
        target = self._url[:200].decode("latin-1") if self._url else "-"
        answer = self.server.refuse(refusal, method, target, self.peer)
        # Answered as 1.0 to a 1.0 client whose request line got that far ("0.0" when
        # it did not: then 1.1, which any client reads).
        version = "1.0" if self._parser.get_http_version() == "1.0" else "1.1"
        request = Request(self, method, target, version, Headers(), self.peer, False)
        self._write_whole(request, answer)
        self.close(linger=True)  # the client may still be sending

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self.deadline = self.loop.time() + seconds
        self.on_deadline = callback

    def _disarm(self) -> None:
        self.on_deadline = None

    def _idle_timed_out(self) -> None:
        if self._current is None and not self._in_head:
            self.close()

    def _head_timed_out(self) -> None:
        if self._current is None and self._in_head:
            self._refuse(
                RequestRefused(
                    408,
                    "request_timeout",
                    f"the request head did not arrive within {self.limits.head_timeout:g}s",
                )
            )


# Tasks kept waiting for a connection's next request, at most: a task and its
# coroutine are about a kilobyte, and thousands of clients that each send one
# request and then idle must not add that much to the memory they hold.
MAX_WAITING_TASKS: Final = 256


def _head_too_large(what: str) -> RequestRefused:
    return RequestRefused(431, "header_too_large", f"{what} is too large")


def _public_reason(exc: BaseException) -> str:
    """llhttp's description of the problem, never the client's bytes."""
    text = str(exc).split("\n", 1)[0].strip()
    match = _SAFE_REASON.fullmatch(text)
    return f"malformed HTTP request: {match.group(0)}" if match else "malformed HTTP request"


def _sweep_period(limits: Limits) -> float:
    """How late a head or idle deadline may fire: a quarter of the shorter one,
    within 10 ms and half a second."""
    return max(0.01, min(0.5, min(limits.head_timeout, limits.idle_timeout) / 4))


class HttpServer:
    """Listening sockets and their connections, and a graceful drain."""

    def __init__(self, handler: Handler, refuse: Refuse, limits: Limits | None = None) -> None:
        self.handler = handler
        self.refuse = refuse
        self.limits = limits or Limits()
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.slow_readers = 0  # clients cut off for not reading
        self.body_bytes = 0  # request body bytes held (Limits.buffered_bodies)
        self.head_bytes = 0  # bytes of unfinished heads held (Limits.buffered_heads)
        self.heads_refused = 0  # heads refused for want of room
        self.bodies_refused = 0  # requests refused for want of room for their body
        self._drained = asyncio.Event()  # set when draining and the last connection closed
        self._servers: list[asyncio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tick = _sweep_period(self.limits)
        self.waiting = 0  # connections' tasks waiting for a next request

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def set_limits(self, limits: Limits) -> None:
        """A reload's limits: for new connections, and for what open ones do next (a
        kept-alive client's next request; a body being read keeps the timing it
        began with, a deadline already set stays)."""
        self.limits = limits
        for conn in self.connections:
            conn.limits = limits
        self._tick = _sweep_period(limits)

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Start accepting on ``host:port``; returns the bound port."""
        server = await self.loop.create_server(
            lambda: as_protocol(HttpConnection(self)),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=4096,
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep(), name="http-deadlines")
        untyped: Any = server  # its sockets are a list under uvloop, a tuple in asyncio
        bound: Any = untyped.sockets[0].getsockname()
        return int(bound[1])

    async def _sweep(self) -> None:
        """Fire the head and idle deadlines that have passed, and end the tasks' waits
        for a next request, every tick."""
        loop = self.loop
        while True:
            await asyncio.sleep(self._tick)
            now = loop.time()
            for conn in list(self.connections):
                if conn._next is not None:
                    conn._end_wait()
                callback = conn.on_deadline
                if callback is not None and conn.deadline <= now:
                    conn.on_deadline = None
                    callback()

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting; close idle connections; give requests in flight up to
        ``drain_timeout`` to finish (each answered with Connection: close); then cut.

        A request is in flight from its first byte: one whose head is still
        arriving may finish arriving (within ``head_timeout``) and is answered, as
        the client cannot tell whether a request cut off mid-head was processed.
        Only connections idle between requests are closed at once."""
        self.draining = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn._current is None and not conn._in_head:
                conn.close()  # idle (its task, if waiting, ends with the connection)
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain_timeout)
        for conn in list(self.connections):
            if conn._task is not None:
                conn._task.cancel()
            conn.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
