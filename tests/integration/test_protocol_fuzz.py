"""Hostile peers, generated: the HTTP/1.1 server against clients, the upstream pool
against upstreams, both driven without sockets on an event loop whose clock moves
only when the test says so (timeouts fire at once, and a run is deterministic).

The server fuzz feeds mutated, pipelined, split requests to one HttpConnection while
the client pauses reading, half-closes or resets, and time jumps past the limits.
The pool fuzz sends requests through a Pool whose upstreams answer with scripted
bytes: split anywhere, 1xx heads first, chunked or close-delimited bodies, broken
status lines, early EOF, resets, stalls, and stray bytes after an answer or while
idle. What each checks is in its test's docstring. test_pipeline_fuzz.py puts this
client and these upstreams on either side of the whole request pipeline.

The default runs take about twenty seconds. SIDECAR_FUZZ_SOAK=1 runs twenty times
as many cases (``SIDECAR_FUZZ_SOAK=1 pytest tests/integration/test_protocol_fuzz.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from sidecar.http import client as http_client
from sidecar.http.client import (
    BrokenAnswer,
    ClientResponse,
    ConnectFailed,
    Disconnected,
    Pool,
    UpstreamConnection,
)
from sidecar.http.messages import Answer, Headers, Response
from sidecar.http.server import (
    ClientGone,
    HttpConnection,
    HttpServer,
    Limits,
    Request,
    RequestRefused,
)
from tests.fake_transport import FakeTransport

SERVER_EXAMPLES = 600
POOL_EXAMPLES = 400
# SIDECAR_FUZZ_SOAK=1: twenty times as many cases, for a soak run outside CI.
SOAK = 20 if os.environ.get("SIDECAR_FUZZ_SOAK") else 1
# A failing case's report holds what it sent: large bodies and heads among it.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


def fuzz_settings(examples: int) -> settings:
    # Derandomized: the same cases on every run, and no example database to replay.
    # A failing case is reported as found, unshrunk: shrinking one takes from seconds
    # to minutes (SIDECAR_FUZZ_SHRINK=1 asks for it).
    phases = [Phase.explicit, Phase.generate]
    if os.environ.get("SIDECAR_FUZZ_SHRINK"):
        phases.append(Phase.shrink)
    return settings(
        max_examples=examples,
        phases=phases,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only by ``advance``; what its exception
    handler is given is kept, and connections it makes are the test's."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.errors: list[dict[str, Any]] = []
        self.set_exception_handler(lambda _, context: self.errors.append(context))
        self.connector: Callable[[Callable[[], Any]], Any] | None = None

    def time(self) -> float:
        return self.now

    async def create_connection(  # type: ignore[override]
        self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        assert self.connector is not None
        return await self.connector(protocol_factory)  # type: ignore[no-any-return]


YOUNG_COLLECTION = 100


async def turns(count: int = 1) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def advance(seconds: float) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualLoop)
    loop.now += seconds
    await turns(3)


def run_on_virtual_loop(main: Callable[[VirtualLoop], Any]) -> list[str]:
    """Run ``main(loop)`` to its end; what went wrong outside it (an exception the
    loop's handler saw: a callback that raised, a task destroyed while pending) is
    returned. No gc.collect() to find tasks in cycles: it was half the run time, and
    ``main`` checks that no task is left.

    The young generation is collected every YOUNG_COLLECTION allocations instead of
    every 700: a compiled class whose traverse function misreports what it holds then
    has live objects cleared within a few cases (tests/unit/test_native_gc.py)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION, *thresholds[1:])
    loop = VirtualLoop()
    try:
        loop.run_until_complete(main(loop))
        loop.run_until_complete(asyncio.sleep(0))
        return [f"{e.get('message')}: {e.get('exception')!r}" for e in loop.errors]
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        gc.set_threshold(*thresholds)


# -- the server: hostile clients --------------------------------------------------------

SMALL = Limits(
    max_line=200,
    max_head=600,
    max_headers=8,
    head_timeout=2.0,
    body_timeout=3.0,
    idle_timeout=6.0,
    send_timeout=4.0,
    read_ahead=1000,
    write_buffer=512,
    max_pipelined=3,
    linger=1.0,
    buffered_bodies=25_000,
)
BODY_LIMIT = 64 * 1024
MODES = [
    "echo",
    "echo",
    "sleep_echo",
    "slow",
    "arrived",
    "noread",
    "204",
    "stream",
    "stream_len",
    "stream_short",
    "raise",
]


class Boom(Exception):
    """A handler's own failure: the server answers 500 for it."""


class Handlers:
    """The handler and the refusal callback a server is given, cycling through
    ``modes`` request by request; they record what a client may be sent."""

    def __init__(self, modes: list[str]) -> None:
        self.modes = modes
        self.calls = 0
        self.answers_possible = 0  # handler calls that may answer, and refusals
        self.bodies: dict[int, bytes] = {}  # what the handler answered, by X-Seq
        self.unexpected: list[BaseException] = []

    def refuse(self, refusal: RequestRefused, method: str, target: str, peer: str) -> Response:
        self.answers_possible += 1
        error = {"type": refusal.kind, "message": refusal.message}
        body = json.dumps({"error": error}).encode()
        return Response(refusal.status, body, _tags(method), content_type="application/json")

    async def handle(self, request: Request) -> Answer:
        seq = self.calls
        self.calls += 1
        mode = self.modes[seq % len(self.modes)]
        if mode == "raise":
            raise Boom  # refused (500) by the server: counted in refuse
        self.answers_possible += 1
        tags = [*_tags(request.method), ("X-Seq", str(seq))]
        try:
            if mode == "sleep_echo":
                await asyncio.sleep(0.5)
            elif mode == "slow":
                await asyncio.sleep(40)  # cancelled if the client leaves
            if mode == "arrived":
                body = request.arrived_body(BODY_LIMIT)
                if body is None:
                    body = await request.read_body(BODY_LIMIT)
            elif mode == "noread":
                body = b"noread"
            elif mode == "204":
                return Response(204, b"ignored", tags)
            else:
                body = await request.read_body(BODY_LIMIT) if request.body_exists else b""
            self.bodies[seq] = body
            if not mode.startswith("stream"):
                return Response(200, body, tags)
            body = body or b"streamed-answer"
            self.bodies[seq] = body
            length = {"stream_len": len(body), "stream_short": len(body) + 5}.get(mode)
            writer = await request.stream(200, None, Headers(tags), length)
            step = max(1, len(body) // 3)
            for start in range(0, len(body), step):
                await writer.write(body[start : start + step])
                await asyncio.sleep(0)
            await writer.end()
            return writer.answer
        except RequestRefused as refusal:
            answer = self.refuse(refusal, request.method, request.target, request.peer)
            answer.close = True
            return answer
        except (ClientGone, asyncio.CancelledError):
            raise
        except BaseException as exc:  # anything else is a finding, reported after the run
            self.unexpected.append(exc)
            raise


def _tags(method: str) -> list[tuple[str, str]]:
    # Whether the answer is to a HEAD request (it then has no body): the parser
    # of the output needs it, and the answers are all the test's.
    return [("X-Method", "HEAD" if method == "HEAD" else "other")]


class ClientSide(FakeTransport):
    """The server connection's transport: the client's end of the socket, whose
    writes are kept; a client that sent EOF, or a closed socket, sends no more."""

    def __init__(self, protocol: HttpConnection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.protocol = protocol
        self.loop = loop
        self.out = bytearray()
        self.misuse: list[str] = []
        self.aborted = False
        self.eof_written = False
        self.lost = False
        self.client_eof = False
        self.reset = False
        self.server_closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        # As uvloop: an error after the handle is closed or after write_eof; dropped
        # once close() or abort() was called (connection_lost pending).
        if self.lost:
            self.misuse.append("write after connection_lost")
            raise RuntimeError("unable to perform operation; the handler is closed")
        if self.eof_written:
            self.misuse.append("write after write_eof")
            raise RuntimeError("Cannot call write() after write_eof()")
        if not self.closing:
            self.out += data

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def close(self, *, by_server: bool = True) -> None:
        self.server_closed = self.server_closed or by_server
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.aborted = True
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lose)

    def write_eof(self) -> None:
        self.eof_written = True
        self.server_closed = True

    def can_send(self) -> bool:
        return not (self.paused or self.closing or self.lost or self.client_eof)

    def send_eof(self) -> None:
        """The client half-closes (a server that does not keep it half-open closes)."""
        if not (self.lost or self.client_eof or self.closing):
            self.client_eof = True
            if not self.protocol.eof_received():
                self.close(by_server=False)

    def send_reset(self) -> None:
        if not self.lost:
            self.lost = self.reset = self.closing = True
            self.protocol.connection_lost(ConnectionResetError())


_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d{3}) ([\t\x20-\x7e\x80-\xff]*)")
_FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ?([\t\x20-\x7e\x80-\xff]*)")


@dataclass
class Parsed:
    status: int
    fields: dict[bytes, list[bytes]]
    body: bytes = b""
    close_delimited: bool = False
    closes: bool = False  # the connection ends after it (Connection: close, 1.0, or its body)

    def get(self, name: bytes) -> bytes | None:
        values = self.fields.get(name)
        return values[0] if values else None


def _tagged_head(_: int, answer: Parsed) -> bool:
    return answer.get(b"x-method") == b"HEAD"


def parse_answers(
    out: bytes, to_head: Callable[[int, Parsed], bool] = _tagged_head
) -> tuple[list[Parsed], bool]:
    """The whole answers in what the server wrote (1xx ones too), and whether one
    after them is cut short; an AssertionError for anything not valid HTTP/1.1.
    ``to_head(n, answer)``: whether the n-th final answer is to a HEAD request (it
    has no body); by default, its X-Method field says."""
    answers: list[Parsed] = []
    finals = 0
    pos = 0
    while pos < len(out):
        end = out.find(b"\r\n\r\n", pos)
        if end < 0:
            return answers, True
        lines = out[pos:end].split(b"\r\n")
        pos = end + 4
        status_line = _STATUS_LINE.fullmatch(lines[0])
        assert status_line, f"bad status line {lines[0][:100]!r}"
        answer = Parsed(int(status_line.group(2)), {})
        assert 100 <= answer.status <= 599
        for line in lines[1:]:
            match = _FIELD_LINE.fullmatch(line)
            assert match, f"bad field line {line[:100]!r}"
            answer.fields.setdefault(match.group(1).lower(), []).append(match.group(2))
        if answer.status < 200:
            answers.append(answer)
            continue
        lengths = answer.fields.get(b"content-length", [])
        codings = answer.fields.get(b"transfer-encoding", [])
        assert len(lengths) <= 1, "several Content-Length fields"
        assert not (lengths and codings), "Content-Length and Transfer-Encoding"
        connection = b",".join(answer.fields.get(b"connection", [])).lower()
        closing = b"close" in connection or (
            status_line.group(1) == b"0" and b"keep-alive" not in connection
        )
        if to_head(finals, answer) or answer.status in (204, 304):
            pass
        elif codings:
            assert codings == [b"chunked"], f"Transfer-Encoding {codings}"
            parts = []
            while True:
                line_end = out.find(b"\r\n", pos)
                if line_end < 0:
                    return answers, True
                size = int(out[pos:line_end], 16)
                pos = line_end + 2
                if pos + size + 2 > len(out):
                    return answers, True
                assert out[pos + size : pos + size + 2] == b"\r\n", "a chunk without its CRLF"
                parts.append(out[pos : pos + size])
                pos += size + 2
                if size == 0:
                    break
            answer.body = b"".join(parts)
        elif lengths:
            size = int(lengths[0])
            if pos + size > len(out):
                return answers, True
            answer.body = out[pos : pos + size]
            pos += size
        else:
            answer.body = out[pos:]
            answer.close_delimited = closing = True
            pos = len(out)
        answer.closes = closing
        answers.append(answer)
        finals += 1
        assert not (closing and pos < len(out)), f"bytes after a last answer {out[pos:][:60]!r}"
    return answers, False


def sweep(conn: HttpConnection) -> None:
    """What the server's sweeper does each tick (it runs only once listening)."""
    if conn._next is not None:
        conn._end_wait()
    callback = conn.on_deadline
    if callback is not None and conn.deadline <= conn.server.loop.time():
        conn.on_deadline = None
        callback()


class ServerRun:
    """One client connection to a server, driven by a list of client actions."""

    def __init__(self, data: bytes, modes: list[str], small: bool) -> None:
        self.limits = SMALL if small else Limits()
        self.handlers = Handlers(modes)
        self.pending = bytearray(data)
        self.largest_read = 1

    async def __call__(self, loop: VirtualLoop, actions: list[tuple[Any, ...]]) -> None:
        self.server = server = HttpServer(self.handlers.handle, self.handlers.refuse, self.limits)
        self.conn = conn = HttpConnection(server)
        self.client = client = ClientSide(conn, loop)
        conn.connection_made(client)  # type: ignore[arg-type]
        for action in actions:
            await self.act(*action)
            self.check_state()
        # The client sends the rest as it may, reads everything, then waits.
        for _ in range(1000):
            if client.lost:
                break
            if conn._write_paused:
                conn.resume_writing()
            if self.pending and client.can_send():
                self.send(65536)
                await turns(2)
            else:
                await advance(0.5)
                sweep(conn)
            self.check_state()
        assert client.lost, f"the connection never closed (paused={client.paused})"
        assert server.body_bytes == 0, f"{server.body_bytes} body bytes still charged"
        await turns(5)
        me = asyncio.current_task()
        left = [task for task in asyncio.all_tasks() if task is not me]
        assert not left, f"tasks left after connection_lost: {left}"
        await advance(100)  # nothing fires late
        assert server.waiting == 0
        assert conn not in server.connections

    async def act(self, kind: str, *args: Any) -> None:
        conn, client = self.conn, self.client
        if kind == "send":
            self.send(args[0])
        elif kind == "turn":
            await turns(args[0])
        elif kind == "advance":
            await advance(args[0])
        elif kind == "sweep":
            sweep(conn)
        elif kind == "stop_reading" and not conn._write_paused:
            conn.pause_writing()
        elif kind == "read_again" and conn._write_paused:
            conn.resume_writing()
        elif kind == "eof":
            client.send_eof()
        elif kind == "reset":
            client.send_reset()
        elif kind == "budget":  # a reload changes server.max_buffered_bodies
            self.server.set_limits(dataclasses.replace(self.server.limits, buffered_bodies=args[0]))

    def send(self, size: int) -> None:
        if self.pending and self.client.can_send():
            chunk = bytes(self.pending[:size])
            del self.pending[:size]
            self.largest_read = max(self.largest_read, len(chunk))
            self.conn.data_received(chunk)

    def check_state(self) -> None:
        """Between the client's actions: the body bytes and requests held stay
        bounded, and a connection that waits for a request reads."""
        conn = self.conn
        requests = {id(r): r for r in (conn._current, conn._parsing, *(conn._queue or ()))}
        held = sum(len(part) for r in requests.values() if r is not None for part in r._parts)
        charged = sum(r._charged for r in requests.values() if r is not None)
        assert self.server.body_bytes == charged, (
            f"the server counts {self.server.body_bytes} body bytes, its requests {charged}"
        )
        bound = max(self.limits.read_ahead, BODY_LIMIT) + 2 * self.largest_read + 1024
        assert held <= bound, f"{held} body bytes held (bound {bound})"
        queued = len(conn._queue or ())
        assert queued <= self.limits.max_pipelined + 1, f"{queued} pipelined requests queued"
        idle = conn._current is None and conn._parsing is None and not queued
        open_ = not (conn.closed or conn._lingering or self.client.closing)
        if idle and open_ and conn._pending_refusal is None:
            assert not self.client.paused, "waiting for a request with reading paused"

    def check_output(self) -> None:
        client, handlers = self.client, self.handlers
        assert not client.misuse, client.misuse
        assert not handlers.unexpected, f"the handler saw {handlers.unexpected!r}"
        answers, cut = parse_answers(bytes(client.out))
        if cut and client.server_closed:
            assert client.aborted or client.reset or client.client_eof, (
                f"an answer cut short by a graceful close: {bytes(client.out)[-200:]!r}"
            )
        final = [a for a in answers if a.status >= 200]
        assert len(final) <= handlers.answers_possible, (
            f"{len(final)} answers, {handlers.answers_possible} requests to answer"
        )
        last = -1
        for answer in final:
            assert answer.get(b"x-method") is not None, "an answer neither handler nor refusal made"
            head = answer.get(b"x-method") == b"HEAD"
            if answer.status >= 400 and not head:
                error = json.loads(answer.body)["error"]
                assert error["type"], answer.body
                assert error["message"], answer.body
            seq_field = answer.get(b"x-seq")
            if seq_field is None:
                continue
            seq = int(seq_field)
            assert seq > last, "answers out of order, or one answered twice"
            last = seq
            # A body that ends with the connection is whole only if the server ended
            # it: after the client's reset or EOF, or an abort, what came is all there is.
            ended_early = client.aborted or client.reset or client.client_eof
            if answer.status == 200 and not head and not (answer.close_delimited and ended_early):
                assert answer.body == handlers.bodies[seq], f"answer {seq}: not the handler's body"


VALID_METHODS = ["GET", "POST", "POST", "PUT", "HEAD", "DELETE", "OPTIONS"]
METHODS = [*VALID_METHODS, "PATCH", "CONNECT", "TRACE", "PRI", "get", "SEARCH"]
VALID_VERSIONS = ["HTTP/1.1"] * 6 + ["HTTP/1.0"] * 3
VERSIONS = [*VALID_VERSIONS, "HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "HTTP/3.0"]
VALID_TARGETS = ["/", "/echo", "/a?b=c", "*"]
TARGETS = [*VALID_TARGETS, "http://h/x", "/%zz", "/" + "a" * 300, "h:443"]
BENIGN = [
    b"Expect: 100-continue",
    b"Expect: 100-continue",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Content-Type: application/json",
    b"X-Mid: " + b"v" * 300,
    b"Te: trailers",
    b"Accept: */*",
]
HOSTILE = [
    b"Connection: upgrade",
    b"Upgrade: websocket",
    b"Proxy-Connection: keep-alive",
    b"X-Long: " + b"v" * 9000,
    b"X-Fold: a\r\n b",
    b"X-Bad\x01: c",
    b"X-Nul: a\x00b",
    b"Expect: something",
    b"Connection: close, keep-alive",
    b" X-Space: 1",
    b"\r\n".join(b"X-Many: %d" % i for i in range(9)),
]
BAD_LENGTHS = [
    b"Content-Length: -1",
    b"Content-Length: 1e3",
    b"Content-Length: 99999999999999999999999",
    b"Content-Length: ",
    b"Content-Length: 0x10",
    b"Content-Length: +5",
]
BAD_CODINGS = [
    b"Transfer-Encoding: gzip",
    b"Transfer-Encoding: chunked, gzip",
    b"Transfer-Encoding: chunkedx",
    b"Transfer-Encoding:  chunked ",
]


@st.composite
def chunked(draw: st.DrawFn, body: bytes, valid: bool) -> bytes:
    out = bytearray()
    extensions = [b"", b"", b";a=b", b';q="x"']
    if not valid:
        extensions += [b";" + b"e" * 300, b" "]
    start = 0
    while start < len(body):
        size = draw(st.integers(1, len(body) - start))
        out += draw(st.sampled_from([b"%x", b"%X", b"00%x"])) % size
        out += draw(st.sampled_from(extensions)) + b"\r\n" + body[start : start + size] + b"\r\n"
        start += size
    ends = [b"0\r\n\r\n", b"0\r\n\r\n", b"0\r\nX-T: 1\r\nContent-Length: 5\r\n\r\n"]
    if not valid:
        ends += [b"0\r\nX-T: " + b"t" * 10000 + b"\r\n\r\n", b"", b"zz\r\n\r\n"]
    return bytes(out + draw(st.sampled_from(ends)))


@st.composite
def http_request(draw: st.DrawFn) -> bytes:
    valid = draw(st.integers(0, 9)) < 8
    method = draw(st.sampled_from(VALID_METHODS if valid else METHODS))
    target = draw(st.sampled_from(VALID_TARGETS if valid else TARGETS))
    version = draw(st.sampled_from(VALID_VERSIONS if valid else VERSIONS))
    lines = [f"{method} {target} {version}".encode()]
    if draw(st.booleans()):
        lines.append(b"Host: example")
    size = draw(st.sampled_from([0, 0, 0, 0, 1, 5, 100, 1500, 1500, 20000, 70000, 300000]))
    if size > 200:
        body = bytes([0x61 + size % 26]) * size
    else:
        body = draw(st.binary(min_size=size, max_size=size))
    framings = ["cl", "cl", "chunked"] + ([] if body else ["none"])
    if not valid:
        framings = ["cl", "chunked", "none", "cl+te", "cl2", "clbad", "tebad", "cl_short"]
        framings += ["cl_long", "te_gzip_chunked"]
    framing = draw(st.sampled_from(framings))
    payload = body
    if framing == "cl":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing in ("chunked", "cl+te", "te_gzip_chunked"):
        if framing == "cl+te":
            lines.append(b"Content-Length: %d" % len(body))
        coding = b"gzip, chunked" if framing == "te_gzip_chunked" else b"chunked"
        lines.append(b"Transfer-Encoding: " + coding)
        payload = draw(chunked(body, valid))
    elif framing == "cl2":
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
    elif framing == "clbad":
        lines.append(draw(st.sampled_from(BAD_LENGTHS)))
    elif framing == "tebad":
        lines.append(draw(st.sampled_from(BAD_CODINGS)))
    elif framing == "cl_short":
        lines.append(b"Content-Length: %d" % (len(body) + 10))
    elif framing == "cl_long":
        lines.append(b"Content-Length: %d" % max(0, len(body) - 1))
    for extra in draw(st.lists(st.sampled_from(BENIGN if valid else BENIGN + HOSTILE), max_size=3)):
        lines.insert(draw(st.integers(1, len(lines))), extra)
    eol = b"\r\n" if valid else draw(st.sampled_from([b"\r\n"] * 3 + [b"\n"]))
    return eol.join(lines) + eol + eol + payload


@st.composite
def client_bytes(draw: st.DrawFn) -> bytes:
    """A few requests back to back, then damaged here and there."""
    requests = draw(st.lists(http_request(), min_size=1, max_size=5))
    data = bytearray(draw(st.sampled_from([b"", b"", b"\r\n", b"\r\n\r\n"])) + b"".join(requests))
    for _ in range(draw(st.integers(-6, 3))):  # undamaged in six cases of ten
        if not data:
            break
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup", "truncate", "junk"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            pieces = [b"\r\n", b"\n", b"\x00", b" ", b":", b"\r", b"0", b"HTTP/1.1"]
            data[pos:pos] = draw(st.sampled_from(pieces))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=20))
    return bytes(data)


_READ_SIZES = st.one_of(st.integers(1, 16), st.integers(1, 3000), st.integers(1, 70000))
_CLIENT_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), _READ_SIZES),
        st.tuples(st.just("send"), _READ_SIZES),
        st.tuples(st.just("send"), _READ_SIZES),
        st.tuples(st.just("turn"), st.integers(1, 5)),
        st.tuples(st.just("advance"), st.sampled_from([0.01, 0.3, 1.0, 2.5, 5.0, 11.0, 80.0])),
        st.tuples(st.just("sweep")),
        st.tuples(st.just("stop_reading")),
        st.tuples(st.just("stop_reading")),
        st.tuples(st.just("read_again")),
        st.tuples(st.just("budget"), st.sampled_from([3_000, 25_000, 1 << 20])),
    ),
    max_size=40,
)


@st.composite
def client_actions(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """What the client does, in order: it sends first, and in two cases of three
    it leaves somewhere after (EOF or reset), else it stays until the server closes."""
    actions = [("send", draw(_READ_SIZES)), *draw(_CLIENT_STEPS)]
    leave = draw(st.sampled_from([None, "eof", "reset"]))
    if leave is not None:
        actions.insert(len(actions) - draw(st.integers(0, len(actions) - 1)), (leave,))
    return actions


@pytest.mark.timeout(1800 if SOAK > 1 else 300)
@fuzz_settings(SERVER_EXAMPLES * SOAK)
@given(
    data=client_bytes(),
    actions=client_actions(),
    modes=st.lists(st.sampled_from(MODES), min_size=1, max_size=4),
    small=st.integers(0, 9).map(lambda i: i < 7),
)
def test_the_server_survives_hostile_clients(
    data: bytes, actions: list[tuple[Any, ...]], modes: list[str], small: bool
) -> None:
    """Whatever a client sends, and however it reads, pauses, half-closes or resets:
    no protocol callback raises and the loop sees no stray error; what was written
    parses as HTTP/1.1 answers in request order, never more than requests, each
    handler's body intact, error answers JSON; a graceful close never cuts an
    answer; the bytes held stay bounded; the connection ends, leaving no task."""
    run = ServerRun(data, modes, small)
    with capture_logs() as logs:
        errors = run_on_virtual_loop(lambda loop: run(loop, actions))
    assert not errors, f"the loop's exception handler was called: {errors}"
    run.check_output()
    events = [entry["event"] for entry in logs]
    expected = ["http_handler_failed"] if "raise" in modes else []
    assert set(events) <= set(expected), f"unexpected logs {events}"


# -- the upstream pool: hostile upstreams ----------------------------------------------

ALLOWED = (BrokenAnswer, Disconnected, TimeoutError, ConnectFailed)  # what callers may see
TOKEN = re.compile(rb"<[0-9a-f]{12}>")
FRACTION = st.integers(0, 1 << 16)  # a position in something whose length is not known yet


@functools.cache  # checked against every marker an answer carries
def token(k: int) -> bytes:
    """A marker only request ``k``'s answer carries (in its head and its body)."""
    return b"<" + hashlib.sha1(b"%d" % k).hexdigest()[:12].encode() + b">"  # noqa: S324 (a tag)


def part_of(length: int, fraction: int) -> int:
    return length * fraction >> 16


INFORMATIONAL = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\nContent-Length: 3\r\n\r\n",
]
BAD_STATUS_LINES = [
    b"HTTP/1.1 000 X",
    b"HTTP/1.1 099 X",
    b"HTTP/1.1 600 X",
    b"HTTP/1.1 999 X",
    b"HTTP/1.1 101 Switching",
    b"HTTP/2.0 200 OK",
    b"HTTP/1.1 200 O\x01K",
    b"HTTP/1.1 200 O\x7fK",
    b"HTTP/0.9 200 OK",
    b"ICY 200 OK",
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1 2000 OK",
    b"HTTP/1.1 200",
]
MUTATIONS = [b"\r\n", b"\n", b"0", b"\x00", b" ", b"HTTP/1.1 200 OK\r\n\r\n"]


@dataclass(frozen=True)
class AnswerPlan:
    """How an upstream answers one request: drawn as a whole, built into bytes when
    the request is written (its marker is then known)."""

    kind: str
    status: int
    repeats: int  # the body is the request's marker this many times
    informational: tuple[int, ...]  # 1xx heads first
    after: str  # once all is sent: keep the connection, eof or reset
    chunks: tuple[int, ...]  # chunk sizes, as fractions of what is left
    trailer: int
    bad_status: int
    upgrade: bool
    big_field: int
    fields: int
    damage: str
    cut: int
    mutations: tuple[tuple[str, int, int], ...]
    extra: str  # bytes after the answer
    joined: bool  # the extra bytes in the same read as the answer

    def ends_connection(self, method: bytes) -> bool:
        """Whether the connection may not be used after this answer: it said so, or
        its body ends with the connection, or it answered HEAD (the pool cannot
        tell llhttp that no body follows). A 204 or 304 has no body to end with the
        connection: what follows its head is stray."""
        closing = self.kind in ("conn_close", "v10") or (
            self.kind == "close" and self.status not in (204, 304)
        )
        return method == b"HEAD" or (closing and self.damage == "none")

    def render(self, k: int) -> tuple[list[tuple[bytes, str]], str]:
        """The bytes the upstream sends (each part with what it is), and what it
        does once they are sent."""
        mark = token(k)
        body = mark * self.repeats
        head = [b"HTTP/1.1 %d OK" % self.status, b"X-Id: " + mark]
        after = self.after
        payload = body
        kind = self.kind
        if kind in ("cl", "conn_close", "v10ka"):
            head.append(b"Content-Length: %d" % len(body))
            if kind == "conn_close":
                head.append(b"Connection: close")
            elif kind == "v10ka":
                head[0] = b"HTTP/1.0 %d OK" % self.status
                head.append(b"Connection: keep-alive")
            else:
                after = "keep"
        elif kind == "chunked":
            head.append(b"Transfer-Encoding: chunked")
            payload, start = b"", 0
            for i, fraction in enumerate(self.chunks * 4):
                if start >= len(body):
                    break
                left = len(body) - start
                size = left if i == 15 else max(1, part_of(left, fraction))
                extension = b";x=y" if i % 3 == 2 else b""
                payload += b"%x%s\r\n%s\r\n" % (size, extension, body[start : start + size])
                start += size
            ends = [b"0\r\n\r\n", b"0\r\nX-T: " + mark + b"\r\n\r\n"]
            ends.append(b"0\r\nX-T: " + b"t" * 70000 + b"\r\n\r\n")
            payload += ends[self.trailer]
            after = "keep"
        elif kind in ("close", "v10"):
            if kind == "v10":
                head[0] = b"HTTP/1.0 %d OK" % self.status
            if after == "keep":
                after = "eof"
        elif kind == "nobody":
            head[0] = b"HTTP/1.1 %d X" % (204 if self.status < 300 else 304)
            payload = b""
            after = "keep"
        else:
            if kind == "bad_status":
                head[0] = BAD_STATUS_LINES[self.bad_status]
                if self.upgrade:
                    head += [b"Upgrade: websocket", b"Connection: upgrade"]
            elif kind == "huge_head":
                head.append(b"X-Big: " + b"b" * self.big_field)
            else:
                head += [b"X-F%d: v" % i for i in range(self.fields)]
            head.append(b"Content-Length: %d" % len(body))
            after = "keep"
        first = b"".join(INFORMATIONAL[i] for i in self.informational)
        answer = first + b"\r\n".join(head) + b"\r\n\r\n" + payload
        if self.damage in ("early_eof", "early_reset", "stall"):
            answer = answer[: part_of(len(answer) - 1, self.cut)]
            after = {"early_eof": "eof", "early_reset": "reset", "stall": "keep"}[self.damage]
        elif self.damage == "mutate":
            damaged = bytearray(answer)
            for op, fraction, value in self.mutations:
                pos = part_of(len(damaged) - 1, fraction)
                if op == "flip":
                    damaged[pos] = value & 0xFF
                elif op == "insert":
                    damaged[pos:pos] = MUTATIONS[value % len(MUTATIONS)]
                else:
                    del damaged[pos : pos + 1 + value % 5]
            answer = bytes(damaged)
        out = [(answer, "answer")]
        # More than was asked for: stray bytes, unless the answer was damaged (its end
        # is then unknown, and what follows may be taken as part of it).
        second = b"HTTP/1.1 200 OK\r\nX-Id: " + mark + b"\r\nContent-Length: 14\r\n\r\n" + mark
        more = {"dup": answer, "junk": b"garbage" + mark, "crlf": b"\r\n", "second": second}
        if self.extra in more:
            out.append((more[self.extra], "stray" if self.damage == "none" else "dirty"))
            if self.joined:
                out = [(b"".join(data for data, _ in out), "joined")]
        return out, after


# Half of them keep the connection alive, so that connections are reused.
ANSWER_KINDS = ["cl"] * 4 + ["chunked"] * 3 + ["nobody", "v10ka", "close", "v10", "conn_close"]
ANSWER_KINDS += ["bad_status", "huge_head", "many_fields"]
ANSWER_PLANS = st.builds(
    AnswerPlan,
    kind=st.sampled_from(ANSWER_KINDS),
    status=st.sampled_from([200, 200, 201, 404, 500, 204, 304]),
    repeats=st.sampled_from([0, 1, 3, 100, 30000]),
    informational=st.lists(st.integers(0, len(INFORMATIONAL) - 1), max_size=2).map(tuple),
    after=st.sampled_from(["keep", "eof", "eof", "reset"]),
    chunks=st.lists(FRACTION, min_size=1, max_size=4).map(tuple),
    trailer=st.integers(0, 2),
    bad_status=st.integers(0, len(BAD_STATUS_LINES) - 1),
    upgrade=st.booleans(),
    big_field=st.sampled_from([1000, 60000, 70000, 200000]),
    fields=st.sampled_from([10, 199, 201, 500]),
    damage=st.sampled_from(["none"] * 9 + ["early_eof", "early_reset", "stall", "mutate"]),
    cut=FRACTION,
    mutations=st.lists(
        st.tuples(st.sampled_from(["flip", "insert", "delete"]), FRACTION, st.integers(0, 255)),
        min_size=1,
        max_size=3,
    ).map(tuple),
    extra=st.sampled_from(["none"] * 8 + ["dup", "junk", "crlf", "second"]),
    joined=st.booleans(),
)


@dataclass(frozen=True)
class CallerPlan:
    """One request through the pool, and what its caller does with the answer."""

    method: str
    body: int  # its size, in a POST
    replayable: bool
    within: float  # its deadline, from when it is made
    how: str  # read, chunks, take (when complete), release or close unread
    idle: float  # the longest silence read_chunk waits for


CALLER_PLANS = st.builds(
    CallerPlan,
    method=st.sampled_from(["GET", "POST", "HEAD", "GET"]),
    body=st.sampled_from([0, 10, 70000]),
    replayable=st.booleans(),
    within=st.sampled_from([0.05, 0.5, 3.0, 30.0, 30.0, 30.0]),
    how=st.sampled_from(["read"] * 3 + ["chunks", "chunks", "take", "release", "close"]),
    idle=st.sampled_from([0.2, 2.0]),
)
STEP_KINDS = ["spawn"] * 2 + ["deliver"] * 6 + ["turn"] * 2
STEP_KINDS += ["advance", "stray_while_idle", "close_by_upstream", "cancel"]
# A step, which of the candidates it acts on (modulo their number), and a size.
STEPS = st.tuples(st.sampled_from(STEP_KINDS), st.integers(0, 15), st.integers(0, 6))
READS = [1, 7, 100, 5000, 70000, 1 << 20]
ADVANCES = [0.01, 0.01, 0.1, 0.1, 0.6, 2.5, 40.0]
STRAYS = [b"HTTP/1.1 200 OK\r\n\r\n", b"x", b"\r\n"]


class UpstreamScript(Protocol):
    """What scripted upstreams answer, and where they report what they saw."""

    violations: list[str]

    def answer(self, k: int, method: bytes) -> tuple[list[tuple[bytes, str]], str, bool]:
        """For request ``k``: the bytes to deliver (each part with what it is), what
        to do once they are delivered (keep the connection, eof or reset), and
        whether the connection may not be used after this answer."""
        ...


class Upstream(FakeTransport):
    """The upstream's end of one pooled connection (and the connection's transport):
    it answers each request from its script when the request is written, and
    delivers those bytes when the test says so, as much as the test says."""

    def __init__(self, run: UpstreamScript, conn: UpstreamConnection) -> None:
        super().__init__()
        self.run = run
        self.conn = conn
        self.out: list[tuple[bytes, str]] = []  # bytes to deliver, and what they are
        self.after = "keep"  # once delivered: keep the connection, eof or reset
        self.tainted = False  # it delivered bytes nobody asked for
        self.ended = False  # its last answer ends the connection (Connection: close...)
        self.lost = False
        self.in_flight = False

    def lose(self, exc: BaseException | None = None) -> None:
        if not self.lost:
            self.lost = True
            self.conn.connection_lost(exc)

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.lose)

    close = abort

    def write(self, data: bytes) -> None:
        assert not self.lost, "a write to a closed connection"
        if self.closing:
            return
        match = re.match(rb"([A-Z]+) /r(\d+) HTTP/1.1\r\n", data)
        if match is None:
            if not self.in_flight:  # else a large body written after its head
                self.run.violations.append(f"a write that is not a request {data[:80]!r}")
            return
        if self.tainted:
            self.run.violations.append("a connection that received stray bytes was reused")
        if self.ended:
            self.run.violations.append("a connection reused after an answer that ended it")
        # Bytes of an earlier answer not delivered yet were never sent: dropped.
        self.in_flight = True
        self.out, self.after, self.ended = self.run.answer(int(match.group(2)), match.group(1))
        if not self.out and self.after != "keep":  # it closes as the request comes
            exc = None if self.after == "eof" else ConnectionResetError()
            asyncio.get_running_loop().call_soon(self.lose, exc)

    def deliver(self, size: int) -> bool:
        """Up to ``size`` bytes of the plan, as one read; False when there was none
        to make (closed, reading paused, nothing left)."""
        if self.lost or self.closing or self.paused or not self.out:
            return False
        data, kind = self.out[0]
        chunk, rest = data[:size], data[size:]
        if rest:
            self.out[0] = (rest, kind)
        else:
            self.out.pop(0)
        if kind == "stray" and chunk.strip(b"\r\n"):
            self.tainted = True
        self.conn.data_received(chunk)
        if not self.out and self.after != "keep":
            self.lose(None if self.after == "eof" else ConnectionResetError())
        return True


def pool_violations(pool: Pool, upstreams: Sequence[Upstream], connecting: int) -> list[str]:
    """What is wrong with the pool's accounting of its connections (all of which go
    to ``upstreams``, and ``connecting`` more are being made)."""
    violations = []
    if not 0 <= pool.open <= pool.max_connections:
        violations.append(f"pool.open = {pool.open}")
    counted = sum(1 for u in upstreams if u.conn.counted)
    if counted + connecting != pool.open:
        violations.append(f"pool.open = {pool.open}, {counted} connections counted")
    if len({id(c) for c in pool._idle}) != len(pool._idle):
        violations.append("a connection twice in the idle list")
    for conn in pool._idle:
        if conn._head is not None or conn.response is not None:
            violations.append("an idle connection still holds a request")
        if conn._reading_paused and not conn.closed:
            violations.append("an idle connection has reading paused")
    for upstream in upstreams:
        conn = upstream.conn
        waiting = conn._head is not None and not conn._head.done()
        if upstream.paused and waiting and not conn.closed:
            violations.append("waiting for an answer's head with reading paused")
    return violations


def connect_upstream(
    protocol_factory: Callable[[], Any], make: Callable[[Any], Upstream], upstreams: list[Any]
) -> tuple[Any, Any]:
    """The connection a pool asked for, its far end a new scripted upstream (kept in
    ``upstreams``)."""
    conn = protocol_factory()
    upstream = make(conn)
    conn.connection_made(upstream)
    upstreams.append(upstream)
    return upstream, conn


async def upstream_step(
    kind: str, pick: int, size: int, live: Sequence[Upstream], pool: Pool
) -> bool:
    """A step on the upstreams' side or the clock's, as the pool and pipeline fuzz
    tests take them: one read delivered, loop turns, time passing, stray bytes on an
    idle connection. False when ``kind`` is none of these."""
    if kind == "deliver":
        sending = [u for u in live if u.out]
        if sending:
            sending[pick % len(sending)].deliver(READS[size % len(READS)])
    elif kind == "turn":
        await turns(1 + size)
    elif kind == "advance":
        await advance(ADVANCES[size])
    elif kind == "stray_while_idle":
        idle = [u for u in live if u.conn in pool._idle]
        if idle:
            upstream = idle[pick % len(idle)]
            upstream.out.append((STRAYS[size % len(STRAYS)], "stray"))
            upstream.deliver(1 << 20)
    else:
        return False
    return True


class PoolRun:
    """Callers sharing one pool, whose connections go to scripted upstreams."""

    def __init__(
        self,
        max_connections: int,
        answers: list[AnswerPlan],
        callers: list[CallerPlan],
        connects: list[str],
    ) -> None:
        self.pool = Pool("up", 9, max_connections=max_connections, connect_timeout=1.0)
        self.answers = answers
        self.caller_plans = callers
        self.connects = connects
        self.violations: list[str] = []
        self.upstreams: list[Upstream] = []
        self.callers: list[asyncio.Task[None]] = []
        self.written = 0
        self.connecting = 0
        self.deadline_slots: set[int] = set()

    def answer(self, k: int, method: bytes) -> tuple[list[tuple[bytes, str]], str, bool]:
        plan = self.answers[self.written % len(self.answers)]
        self.written += 1
        return (*plan.render(k), plan.ends_connection(method))

    async def connect(self, protocol_factory: Callable[[], Any]) -> tuple[Any, Any]:
        how = self.connects[(len(self.upstreams) + self.connecting) % len(self.connects)]
        self.connecting += 1
        try:
            if how == "refused":
                await asyncio.sleep(0)
                raise ConnectionRefusedError(111, "refused")
            if how == "slow":
                await asyncio.sleep(3600)  # the pool's connect timeout ends it
            return connect_upstream(
                protocol_factory, lambda conn: Upstream(self, conn), self.upstreams
            )
        finally:
            self.connecting -= 1

    def deadline(self, seconds: float) -> float:
        """A deadline in a slot of the pool's timer wheel of its own: the answers due
        in one slot expire in the order of a set (by address), which would make a
        run depend on where objects were allocated."""
        resolution = http_client.Deadlines.RESOLUTION
        deadline = asyncio.get_running_loop().time() + seconds
        while int(deadline / resolution) + 1 in self.deadline_slots:
            deadline += resolution
        self.deadline_slots.add(int(deadline / resolution) + 1)
        return deadline

    def check(self) -> None:
        self.violations += pool_violations(self.pool, self.upstreams, self.connecting)

    async def caller(self, k: int, plan: CallerPlan) -> None:
        try:
            response = await self.pool.request(
                plan.method,
                f"/r{k}",
                [b"X-A: b\r\n"],
                b"y" * plan.body if plan.method == "POST" else None,
                replayable=plan.replayable,
                deadline=self.deadline(plan.within),
            )
        except ALLOWED:
            return
        except Exception as exc:  # noqa: BLE001 (any other is a finding, reported)
            self.violations.append(f"request raised {exc!r}")
            return
        try:
            await self.read(k, response, plan)
            response.release()
        except ALLOWED:
            pass
        except Exception as exc:  # noqa: BLE001 (any other is a finding, reported)
            self.violations.append(f"reading raised {exc!r}")
        finally:
            response.close()  # when not released

    async def read(self, k: int, response: ClientResponse, plan: CallerPlan) -> None:
        if not 200 <= response.status <= 599:
            self.violations.append(f"status {response.status} handed out")
        issued = {token(j) for j in range(len(self.callers))}
        mark = response.headers.get_raw(b"x-id")
        if mark is not None and mark != token(k) and mark in issued:
            self.violations.append(f"request {k} got the head of another request's answer")
        got = b""
        if plan.how == "read" and response.complete:
            got = await response.read()
        elif plan.how == "read":
            got = await asyncio.wait_for(response.read(), plan.idle * 3)
        elif plan.how == "chunks":
            while chunk := await response.read_chunk(plan.idle):
                got += chunk
        elif plan.how == "take" and response.complete:
            got = response.take_whole()
        foreign = {m for m in TOKEN.findall(got) if m != token(k) and m in issued}
        if foreign:
            self.violations.append(f"request {k} got bytes of another's answer {foreign}")

    async def __call__(self, loop: VirtualLoop, steps: list[tuple[str, int, int]]) -> None:
        loop.connector = self.connect
        for kind, pick, size in steps:
            live = [u for u in self.upstreams if not u.lost]
            if await upstream_step(kind, pick, size, live, self.pool):
                pass
            elif kind == "spawn" and len(self.callers) < len(self.caller_plans):
                plan = self.caller_plans[len(self.callers)]
                self.callers.append(loop.create_task(self.caller(len(self.callers), plan)))
            elif kind == "close_by_upstream" and live:
                live[pick % len(live)].lose(None if size % 2 else ConnectionResetError())
            elif kind == "cancel":
                running = [t for t in self.callers if not t.done()]
                if running:
                    running[pick % len(running)].cancel()
            self.check()
        # The callers not made yet come one at a time; the upstreams send all they
        # have; time passes until every caller is done.
        for _ in range(300):
            if len(self.callers) < len(self.caller_plans):
                plan = self.caller_plans[len(self.callers)]
                self.callers.append(loop.create_task(self.caller(len(self.callers), plan)))
            for upstream in self.upstreams:
                while upstream.deliver(1 << 20):
                    await turns(1)
            await turns(2)
            self.check()
            if len(self.callers) == len(self.caller_plans) and all(t.done() for t in self.callers):
                break
            await advance(1.0)
        hung = [t for t in self.callers if not t.done()]
        if hung:
            self.violations.append(f"{len(hung)} callers never finished")
        for task in self.callers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.violations.append(f"a caller raised {task.exception()!r}")
        self.pool.close()
        await turns(5)
        self.check()
        if self.pool.open != 0:
            self.violations.append(f"pool.open = {self.pool.open} after close, none in flight")
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not me and t not in self.callers]
        if left:
            self.violations.append(f"tasks left: {left}")


@pytest.mark.timeout(1800 if SOAK > 1 else 300)
@fuzz_settings(POOL_EXAMPLES * SOAK)
@given(
    max_connections=st.sampled_from([1, 2, 4]),
    steps=st.lists(STEPS, min_size=10, max_size=80),
    callers=st.lists(CALLER_PLANS, min_size=1, max_size=12),
    answers=st.lists(ANSWER_PLANS, min_size=1, max_size=12),
    connects=st.lists(st.sampled_from(["ok"] * 8 + ["refused", "slow"]), min_size=1, max_size=6),
)
def test_the_pool_survives_hostile_upstreams(
    max_connections: int,
    steps: list[tuple[str, int, int]],
    callers: list[CallerPlan],
    answers: list[AnswerPlan],
    connects: list[str],
) -> None:
    """Whatever upstreams send, and when: callers see an answer or one of the pool's
    documented errors, never a status outside 200-599 nor a byte of another request's
    answer; 0 <= open <= max_connections and matches the connections held; a
    connection that received stray bytes is never reused, and one in the pool or
    waiting for a head never has reading paused; nobody hangs, nothing is left."""
    run = PoolRun(max_connections, answers, callers, connects)
    errors = run_on_virtual_loop(lambda loop: run(loop, steps))
    assert not errors, f"the loop's exception handler was called: {errors}"
    violations = list(dict.fromkeys(run.violations))  # each once, in order
    assert not violations, "; ".join(violations[:5])
