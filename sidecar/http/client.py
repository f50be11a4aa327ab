"""The sidecar's HTTP/1.1 client: a keep-alive pool per upstream, llhttp to parse.

One request at a time on a connection. A connection goes back to the pool only
when its answer was read to the end and the upstream kept it alive; one that
receives bytes while idle, or sees EOF, is out of step and is closed, never
reused (one stray answer must not become the next client's). The pool caps its
connections; requests past the cap wait (the caller's deadline bounds the wait),
and the warmest idle connection is reused first. A request that fails on a reused
connection before any byte of its answer is sent once more on a fresh one when it
may be replayed.

Status lines are checked: codes outside 100-599, a 101 nobody asked for, and
reason phrases with control bytes are refused (``BrokenAnswer``); 1xx answers
other than 101 are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import socket
from collections import deque
from typing import Any, ClassVar, Final, cast

import httptools

from sidecar.http.messages import Headers, RawField, lower_key, media_type, parsed_version
from sidecar.http.transport import FlowControlled, as_protocol

READ_AHEAD: Final = 256 * 1024  # answer bytes buffered before reading from the upstream pauses
# An answer's head (its 1xx heads included) and its trailers, like Envoy's limits
# (60 KiB, 100 fields) with room to spare: past them the answer is broken (502).
MAX_HEAD: Final = 64 * 1024
MAX_FIELDS: Final = 200
# Request bodies up to this size are joined with their head into one write; larger
# ones are written after it, not copied.
_JOINED_BODY: Final = 64 * 1024
# What a reason phrase may hold (RFC 9112 section 4): tab, space, visible and
# obs-text bytes; a control byte makes the status line broken. The table maps every
# control byte to NUL and the rest to themselves (a translate that deletes the
# allowed bytes instead builds its table on each call).
_CONTROL_BYTES: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
_CONTROL_TO_NUL: Final = bytes.maketrans(_CONTROL_BYTES, b"\x00" * len(_CONTROL_BYTES))


class ConnectFailed(Exception):
    """No connection could be made: refused, unreachable, a host name that does not
    resolve, or none within the connect timeout. ``reason`` says which, in words fit
    for a client (no address, no class name)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _connect_error(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):  # its errno is getaddrinfo's, not the OS's
        return "its host name does not resolve"
    if exc.errno:
        return os.strerror(exc.errno).lower()
    # e.g. asyncio's "Multiple exceptions" when each address of a name failed its own way
    return "the connection failed"


class Disconnected(Exception):
    """The upstream closed the connection before its answer began."""


class PoolClosed(Disconnected):
    """The pool was closed (the config that used it was retired) before this request
    had a connection: nothing of it was sent."""


class BrokenAnswer(Exception):
    """The answer is not valid HTTP, or ended before it was complete."""


_T: Final = frozenset(b"tT")  # the first byte of text/* media types


class ClientResponse:
    """An upstream's answer: the head at once, the body as it arrives."""

    __slots__ = (
        "_buffered",
        "_conn",
        "_error",
        "_parts",
        "_released",
        "_waiter",
        "complete",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self, conn: UpstreamConnection, status: int, reason: str, headers: Headers
    ) -> None:
        self.status = status
        self.reason = reason
        # The relay hands this object on as the client's answer headers, which the
        # pipeline then stamps (X-Request-ID, Server-Timing): read the model's own
        # values before the answer is relayed.
        self.headers = headers
        length = headers.get_raw(b"content-length")  # digits only: llhttp checked them
        self.content_length = int(length) if length is not None else None
        self.complete = False  # every byte of the body has arrived
        self._conn = conn
        self._parts: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._released = False

    @property
    def content_type(self) -> str:
        return media_type(self.headers.get("content-type"))

    @property
    def event_stream(self) -> bool:
        """Whether the answer is server-sent events (relayed as they come)."""
        value = self.headers.get_raw(b"content-type")
        if not value or value[0] not in _T:
            return False  # not text/*: without decoding and splitting the value
        return self.content_type == "text/event-stream"

    @property
    def close_delimited(self) -> bool:
        return self.content_length is None and "transfer-encoding" not in self.headers

    def _feed(self, chunk: bytes) -> None:
        self._parts.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > READ_AHEAD and self._waiter is None:
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_chunk(self, idle: float | None = None) -> bytes:
        """The next part of the body; ``b""`` at its end. ``BrokenAnswer`` when the
        upstream broke it off; ``TimeoutError`` after ``idle`` seconds of silence."""
        while True:
            if self._parts:
                chunk = self._parts.popleft()
                self._buffered -= len(chunk)
                return chunk
            if self.complete:
                return b""
            await self._more(idle)

    async def wait_complete(self, idle: float) -> None:
        """Until every byte of the body has arrived, kept for ``take_whole``.
        ``BrokenAnswer`` when the upstream broke it off; ``TimeoutError`` after
        ``idle`` seconds of silence. For bodies within the read-ahead limit (a larger
        one would pause reading and never complete)."""
        while not self.complete:
            await self._more(idle)

    async def _more(self, idle: float | None) -> None:
        """Until more of the answer arrives (or it ends, or breaks: raised)."""
        if self._error is not None:
            raise self._error
        self._conn.resume_reading()
        loop = self._conn.pool.loop
        waiter = loop.create_future()
        self._waiter = waiter
        timer = None if idle is None else loop.call_later(idle, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def take_whole(self) -> bytes:
        """The whole body of a ``complete`` answer, at once (no await)."""
        assert self.complete
        parts = self._parts  # emptied, not replaced: a deque made per answer for nothing
        self._buffered = 0
        if len(parts) == 1:
            return parts.popleft()
        body = b"".join(parts)
        parts.clear()
        return body

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Hand the connection back: to the pool when the answer was read whole and
        the upstream keeps it alive, else closed."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        conn.pool._done(conn, reusable=self.complete and not self._parts and conn.keep_alive)

    def close(self) -> None:
        """Drop the connection, whatever state the answer is in."""
        if self._released:
            return
        self._released = True
        self._conn.pool._done(self._conn, reusable=False)


class UpstreamConnection(FlowControlled):
    """One connection to an upstream."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport = None  # declared by FlowControlled: see its comment
        self.closed = False
        self.keep_alive = True
        self.counted = True  # holds one of the pool's connection slots
        self.idle_since = 0.0
        self._head: asyncio.Future[ClientResponse] | None = None
        self.response: ClientResponse | None = None
        self._method = ""
        self._received = False  # a byte of the current answer arrived
        # Its first bytes were "HTTP/1.1 ": its version is known without asking the
        # parser, whose get_http_version() formats a new string (2k instructions).
        self._begins_http11 = False
        self._reason = b""
        self._raw_headers: list[RawField] = []
        self._head_bytes = 0  # of the answer's heads (1xx ones too) and its trailers
        self._fields = 0
        self._informational = False
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but act as one.
        self._transport = transport = cast(asyncio.Transport, transport)
        # uvloop sets TCP_NODELAY on TCP transports already.

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.keep_alive = False
        head = self._head
        if head is not None and not head.done():
            head.set_exception(
                Disconnected("closed before answering")
                if not self._received
                else BrokenAnswer("closed in the middle of the answer's head")
            )
        response = self.response
        if response is not None and not response.complete:
            if response.close_delimited and self._method != "HEAD" and exc is None:
                # Such a body ends where the connection does: at a clean close. A reset
                # (exc) means it was cut short (RFC 9112 section 8).
                response._finish()
            else:
                response._fail(BrokenAnswer("the answer ended before it was complete"))

    def data_received(self, data: bytes) -> None:
        if self._head is None or (self.response is not None and self.response.complete):
            # Bytes nobody asked for: the connection is out of step.
            self.pool.stray += 1
            self.keep_alive = False
            self.abort()
            return
        if not self._received:
            self._begins_http11 = data[:9] == b"HTTP/1.1 "
            self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken("an upgrade (101) nobody asked for")
        except httptools.HttpParserError:
            self._broken("an answer that is not valid HTTP")
        else:
            if not self._head.done():
                # Still in the head: llhttp holds an unfinished field until it ends.
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._broken("an answer head that is too large")

    def _broken(self, what: str) -> None:
        error = BrokenAnswer(what)
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        if self.response is not None:
            self.response._fail(error)
        self.keep_alive = False
        self.abort()

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response is not None and self.response.complete:
            # A second answer to one request: the connection is out of step.
            self.pool.stray += 1
            self.keep_alive = False
        self._reason = b""
        self._raw_headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self.response is None:
            self._raw_headers.append((lower_key(name), name, value))
        else:
            # A trailer: not relayed, only bounded.
            self._head_bytes += len(name) + len(value) + 4
        if self._fields > MAX_FIELDS or self._head_bytes > MAX_HEAD:
            raise BrokenAnswer("an answer head (or trailer) that is too large")

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        # Only the first head of what arrived began with those bytes: a final
        # answer after a 1xx one has its version from the parser.
        http11, self._begins_http11 = self._begins_http11, False
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue, 103 Early Hints: not relayed
            return
        head = self._head
        if head is None or head.done():
            return
        reason = self._reason
        version = (
            "1.1"
            if http11
            else parsed_version(parser, self._raw_headers, parser.should_keep_alive())
        )
        if version != "1.1" and version != "1.0":
            head.set_exception(BrokenAnswer(f"an answer in HTTP/{version}"))
            self.keep_alive = False
            return
        if not 200 <= status <= 599:
            head.set_exception(BrokenAnswer(f"status {status}"))
            self.keep_alive = False
            return
        # 0, not b"\x00": a bytes needle costs bytes.__contains__ a TypeError raised
        # and cleared inside (it tries the needle as an int first).
        if 0 in reason.translate(_CONTROL_TO_NUL):
            head.set_exception(BrokenAnswer("a control byte in the status line"))
            self.keep_alive = False
            return
        response = ClientResponse(
            self,
            status,
            reason.decode("latin-1"),
            Headers(raw=self._raw_headers),
        )
        self._raw_headers = []  # the answer's own from here
        self.response = response
        if self._method == "HEAD":
            # No body follows; llhttp cannot be told so, and this parser would wait
            # for one: the connection is not reused.
            self.keep_alive = False
            response.complete = True
        head.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and not response.complete:
            response._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if not self._parser.should_keep_alive():
            self.keep_alive = False
        transport = self._transport
        if transport is not None and transport.get_write_buffer_size():
            # Answered before the whole request was written: what the upstream makes
            # of the rest is unknown (a naive one parses a body as requests, and
            # answers the next client with them). Not reused, like NGINX's
            # request_body_sent check; the rest is dropped with the connection.
            self.keep_alive = False
        response = self.response
        if response is not None:
            response._finish()

    # -- use -----------------------------------------------------------------------

    def send(self, method: str, head: bytes, body: bytes | None) -> asyncio.Future[ClientResponse]:
        """Write one request; the future is the answer's head."""
        transport = self._transport
        if transport is None or self.closed:
            raise Disconnected("the connection is closed")
        self._method = method
        self._received = False
        self._head_bytes = 0
        self._fields = 0
        self.response = None
        head_waiter: asyncio.Future[ClientResponse] = self.pool.loop.create_future()
        self._head = head_waiter
        transport.write(head)
        if body:
            transport.write(body)  # large: not copied into the head (Pool.request)
        return head_waiter

    def reset(self) -> None:
        """Between answers, before the pool keeps or hands on the connection. It
        reads again: an answer read ahead past ``READ_AHEAD`` may have paused it,
        and a paused connection would never see its next answer, nor an EOF or stray
        bytes while idle."""
        self._head = None
        self.response = None
        self.resume_reading()

    def abort(self) -> None:
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.abort()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Deadlines:
    """Futures failed with ``TimeoutError`` at their deadline, rounded up to
    ``RESOLUTION``: one timer for every request due in the same 10 ms, not a timer
    started and cancelled per request (most answers come long before their
    deadline; the timer pair was 1.7 us of a request)."""

    RESOLUTION: ClassVar[float] = 0.01

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, set[asyncio.Future[Any]]] = {}
        # The timers run in a context of their own. Made in the request's, a timer
        # kept that context (its log binding: the request, its body) alive until its
        # slot fired, never cancelled, the route's whole timeout after the answer:
        # 40 requests of 8 MiB held 385 MB for 30 s past server.max_buffered_bodies
        # (16 MiB), the bodies of every request of the last route timeout.
        self._context = contextvars.Context()

    def add(self, deadline: float, waiter: asyncio.Future[Any]) -> int:
        slot = int(deadline / self.RESOLUTION) + 1  # rounded up (an int, not math.ceil's call)
        due = self._slots.get(slot)
        if due is None:
            due = self._slots[slot] = set()
            self._loop.call_at(slot * self.RESOLUTION, self._fire, slot, context=self._context)
        due.add(waiter)
        return slot

    def discard(self, slot: int, waiter: asyncio.Future[Any]) -> None:
        due = self._slots.get(slot)
        if due is not None:
            due.discard(waiter)

    def _fire(self, slot: int) -> None:
        for waiter in self._slots.pop(slot, ()):
            _expire(waiter)


class Pool:
    """Keep-alive connections to one upstream origin."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = 100,
        connect_timeout: float = 2.0,
        keepalive: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.host_header = host if port == 80 else f"{host}:{port}"
        self._host_field = self.host_header.encode("latin-1", "replace")
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.open = 0  # connections counted against the cap
        self.stray = 0  # connections closed for bytes nobody asked for
        self.replayed = 0  # requests sent again after a reused connection failed
        self._idle: list[UpstreamConnection] = []
        # Requests waiting for a connection: each gets one handed over, or None when
        # a slot came free (it may then connect).
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines_of: Deadlines | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the pool serves, looked up once (each lookup is a getpid())."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @property
    def _deadlines(self) -> Deadlines:
        deadlines = self._deadlines_of
        if deadlines is None:
            deadlines = self._deadlines_of = Deadlines(self.loop)
        return deadlines

    async def request(
        self,
        method: str,
        target: str,
        fields: list[bytes],
        body: bytes | None,
        *,
        replayable: bool,
        connect_timeout: float | None = None,
        deadline: float | None = None,
    ) -> ClientResponse:
        """Send one request and return its answer's head; ``TimeoutError`` when it
        has not come by ``deadline`` (loop time: waiting for a connection slot,
        connecting and the answer's head all count). ``fields`` are the header
        fields as pieces of their wire form (``Headers.render_into``); Host and the body's
        length are added here. The caller owns the answer (``release`` or
        ``close`` it)."""
        # One join of the whole message (bytes += is a generic call under mypyc, and
        # each format or concatenation a copy); a small body goes in the same write.
        parts = [
            method.encode("latin-1"),
            b" ",
            target.encode("latin-1", "replace"),
            b" HTTP/1.1\r\nHost: ",
            self._host_field,
            b"\r\n",
        ]
        parts += fields
        if body is not None:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        if body and len(body) <= _JOINED_BODY:
            parts.append(body)
            body = None
        head = b"".join(parts)
        first = True
        while True:
            conn = self._warm_idle()
            reused = conn is not None
            if conn is None:
                conn, reused = await self._acquire(
                    connect_timeout or self.connect_timeout, deadline
                )
            slot = None
            try:
                head_waiter = conn.send(method, head, body)
                if deadline is not None:
                    slot = self._deadlines.add(deadline, head_waiter)
                return await head_waiter
            except Disconnected:
                self._done(conn, reusable=False)
                if first and reused and replayable:
                    # The upstream closed a kept-alive connection as we used it.
                    first = False
                    self.replayed += 1
                else:
                    raise
            except BaseException:
                self._done(conn, reusable=False)  # cancelled or broken: out of step
                raise
            finally:
                if slot is not None:
                    self._deadlines.discard(slot, head_waiter)

    def _warm_idle(self) -> UpstreamConnection | None:
        """The warmest idle connection still fit for use (LIFO), if any, unless
        requests are waiting: they come first."""
        idle = self._idle
        if not idle or self._closed or self._waiters:
            return None
        return self._pop_idle()

    def _pop_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        stale = self.loop.time() - self.keepalive
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > stale:
                return conn
            self._forget(conn)
        return None

    async def _acquire(
        self, connect_timeout: float, deadline: float | None
    ) -> tuple[UpstreamConnection, bool]:
        """A connection for one request: idle, new (under the cap), or, past the cap,
        handed over by the request before it in line. Waiters are served in the
        order they came: a request arriving later never takes a connection from one
        that waits (under load, one that lost every race ran into its deadline)."""
        if self._closed:
            raise PoolClosed("the pool is closed")
        loop = self.loop
        first_in_line = not self._waiters
        while True:
            if first_in_line:
                conn = self._pop_idle()
                if conn is not None:
                    return conn, True
                if self.open < self.max_connections:
                    # The attempt's deadline (per try, or the route's) may come before
                    # the connect timeout: running out of it is then the attempt's
                    # TimeoutError, not a failed connect.
                    left = None if deadline is None else deadline - loop.time()
                    if left is not None and left <= 0:
                        self._wake_one()  # a slot that came free for us goes on
                        raise TimeoutError
                    self.open += 1
                    try:
                        if left is not None and left < connect_timeout:
                            return await self._connect(left, deadline_first=True), False
                        return await self._connect(connect_timeout), False
                    except BaseException:
                        self.open -= 1
                        self._wake_one()
                        raise
            waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
            self._waiters.append(waiter)
            timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # It was our turn: pass it on (a connection handed over goes to
                    # the next in line, or back to the idle ones).
                    turn = waiter.result()
                    if turn is None:
                        self._wake_one()
                    else:
                        self._done(turn, reusable=True)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if handed is not None:
                return handed, True
            first_in_line = True  # a slot came free for us: take it before the others

    async def _connect(self, within: float, *, deadline_first: bool = False) -> UpstreamConnection:
        loop = self.loop
        timeout = asyncio.timeout(within)
        try:
            async with timeout:
                _, protocol = await loop.create_connection(
                    lambda: as_protocol(UpstreamConnection(self)), self.host, self.port
                )
                conn = cast(UpstreamConnection, protocol)
        except OSError as exc:  # TimeoutError is one: the timeout says whether it was its
            if not timeout.expired():
                raise ConnectFailed(_connect_error(exc)) from None
            if deadline_first:
                raise TimeoutError from None
            raise ConnectFailed(f"no connection within {within:g}s") from None
        return conn

    def _done(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        if reusable and not conn.closed and conn.keep_alive and not self._closed:
            conn.reset()
            conn.idle_since = self.loop.time()
            while self._waiters:  # the first in line takes it as it is
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            self._idle.append(conn)
        else:
            self._forget(conn)

    def _forget(self, conn: UpstreamConnection) -> None:
        conn.abort()
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            self._forget(conn)
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("the pool is closed"))
