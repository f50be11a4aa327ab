"""Hostile clients and upstreams against the sidecar's own HTTP/1.1 layer, on raw
sockets on 127.0.0.1: each test here failed before the fix named in its docstring."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import orjson
import pytest

from tests.conftest import LOOPBACK, FakeModel, GatedHandler, StartSidecar, base_config, raw_request
from tests.integration.test_http_layer import (
    answer,
    raw_upstream,
    read_head,
    status_and_body,
    upstream_config,
)


async def _read_until_close(reader: asyncio.StreamReader, within: float) -> bytes:
    return await asyncio.wait_for(reader.read(), within)


async def test_a_partial_head_pipelined_behind_a_request_still_times_out(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A request followed at once by the first bytes of the next one, then silence:
    the partial head must be cut off after head_timeout (408), not held forever.
    (The idle deadline armed after the answer ignored a connection in a head.)"""
    config = base_config(fake_model.url)
    config["server"].update(head_timeout="300ms", keepalive_timeout="60s")
    sidecar = await start_sidecar(config)
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\nX-")
        await writer.drain()
        raw = await _read_until_close(reader, 5)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 408 " in raw


async def _send_in_pieces(port: int, pieces: list[bytes]) -> bytes:
    """Each piece in its own write, the next once the sidecar has had time to read it
    (a read of the answer that times out proves nothing was answered yet)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        got = b""
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                got += await asyncio.wait_for(reader.read(65536), 0.05)
        return got + await _read_until_close(reader, 10)
    finally:
        writer.close()


async def test_a_head_under_the_limit_is_accepted_however_it_is_split(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A 24 KB head (the limit is 32 KB) sent in three writes was refused 431: each
    read's bytes were counted once as a partial field and again as complete fields."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 1000) for i in range(24))
    head = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fields + b"\r\n"
    whole = await _send_in_pieces(sidecar.running.main_port, [head])
    assert whole.startswith(b"HTTP/1.1 200 ")
    third = len(head) // 3
    pieces = [head[:third], head[third : 2 * third], head[2 * third :]]
    split = await _send_in_pieces(sidecar.running.main_port, pieces)
    assert split.startswith(b"HTTP/1.1 200 "), split[:200]


async def test_a_pipelined_body_is_not_counted_against_the_next_head(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A 40 KB body followed, in the same write, by the start of the next request:
    the whole read was counted as head bytes of the second request (431)."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    body = b"a" * 40000
    first = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    raw = await _send_in_pieces(
        sidecar.running.main_port,
        [first + b"GET /y HTTP/1.1\r\nHost: x\r\n", b"Connection: close\r\n\r\n"],
    )
    statuses = [int(part[:3]) for part in raw.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 200], raw[:300]


@pytest.mark.parametrize(
    "body",
    [
        b"FFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n",  # a chunk size that overflows
        b"3\nabc\n0\n\n",  # bare LF in the chunk framing
        b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n",  # a framing field as a trailer
        b"zz\r\nabc\r\n0\r\n\r\n",  # not a chunk size
    ],
    ids=["size-overflow", "bare-lf", "content-length-trailer", "bad-size"],
)
async def test_a_malformed_chunked_body_is_refused_400_at_once(
    fake_model: FakeModel, start_sidecar: StartSidecar, body: bytes
) -> None:
    """The parser's error in the middle of a body was kept for after the answer: the
    handler waited for the rest of the body until body_timeout (30 s), then 408."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    raw = await raw_request(
        sidecar.running.main_port,
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
    )
    status, payload = status_and_body(raw)
    assert status == 400
    error = orjson.loads(payload)["error"]
    assert error["type"] == "bad_request"
    assert error["request_id"]
    assert fake_model.hits_for("/x") == []


@pytest.mark.parametrize(
    "start",
    [b"HTTP/1.1 200 OK\r\nX-Endless: ", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK\r\n"],
    ids=["endless-field", "endless-reason", "endless-field-count"],
)
async def test_an_upstream_head_that_never_ends_is_cut_off(
    start_sidecar: StartSidecar, start: bytes
) -> None:
    """An upstream that streams its head forever: the sidecar held every byte until the
    route's timeout (httptools joins a partial field's pieces, quadratic in time),
    where NGINX answers 502 once the head passes its buffer."""
    written = 0
    cut = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        nonlocal written
        await read_head(reader, writer)
        writer.write(start)
        piece = b"X-F: 1\r\n" * 2048 if start.endswith(b"\r\n") else b"a" * 16384
        try:
            while written < 64 * 1024 * 1024:
                writer.write(piece)
                await writer.drain()
                written += len(piece)
        except ConnectionError:
            cut.set()

    async with raw_upstream(script) as (url, _):
        config = upstream_config(url)
        config["routes"][0]["timeout"] = "30s"
        sidecar = await start_sidecar(config, wait_ready=False)
        raw = await raw_request(
            sidecar.running.main_port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 502 ")
        await asyncio.wait_for(cut.wait(), 5)
        # What the kernel's socket buffers took before the hang-up, far from 64 MiB.
        assert written < 16 * 1024 * 1024


async def test_an_upstream_that_sends_trailers_forever_is_cut_off(
    start_sidecar: StartSidecar,
) -> None:
    """Trailer fields after the last chunk were appended to the head's field list
    without a bound until the route's idle timeout: one answer could take gigabytes."""
    written = 0
    cut = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        nonlocal written
        await read_head(reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
        piece = b"X-T: 1\r\n" * 2048
        try:
            while written < 64 * 1024 * 1024:
                writer.write(piece)
                await writer.drain()
                written += len(piece)
        except ConnectionError:
            cut.set()

    async with raw_upstream(script) as (url, _):
        config = upstream_config(url)
        config["upstreams"]["model"]["read_timeout"] = "30s"
        sidecar = await start_sidecar(config, wait_ready=False)
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        raw = await _read_until_close(reader, 10)
        writer.close()
        await asyncio.wait_for(cut.wait(), 5)
        assert written < 16 * 1024 * 1024
        # The answer had begun: it is cut without its last chunk, never ended as whole.
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert not raw.endswith(b"0\r\n\r\n")


async def test_a_request_trailer_that_never_ends_is_refused(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """An unfinished trailer field after the last chunk was not bounded (only a head's
    were): it was held, its pieces joined again and again, until body_timeout."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: "
    )
    written = 0
    answer = b""
    try:
        while written < 64 * 1024 * 1024 and not answer:
            writer.write(b"a" * 65536)
            await writer.drain()
            written += 65536
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(65536), 0.001)
    except ConnectionError:
        pass
    if not answer:
        answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert written < 16 * 1024 * 1024
    assert fake_model.hits_for("/x") == []


async def test_a_chunked_body_in_small_writes_with_a_trailer_is_forwarded(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """The bounds on unfinished lines must not refuse honest chunked uploads: size
    lines and data in separate writes, a body with LFs, a trailer (dropped)."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    data = b"line\n" * 4000 + b"x" * 20000
    pieces = [b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"]
    pieces += [b"Connection: close\r\n\r\n", b"%x\r\n" % len(data), data, b"\r\n"]
    pieces += [b"3\r\n", b"abc\r\n", b"0\r\n", b"X-Trailer: ", b"t\r\n\r\n"]
    raw = await _send_in_pieces(sidecar.running.main_port, pieces)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
    (hit,) = fake_model.hits_for("/x")
    assert hit.body == data + b"abc"
    assert "x-trailer" not in hit.headers


async def test_a_flood_of_pipelined_requests_is_capped(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """One write of 1 MiB of tiny pipelined requests behind a slow one: every request
    of the read was parsed and queued (about 4,500 per connection, ~1 KB each, 35
    times the bytes sent). The queue is capped; past it the client gets a 400 after
    the answers it is owed, and the connection closes."""
    slow = GatedHandler()
    gate, entered = slow.gate, slow.entered
    fake_model.on("/slow", slow)
    sidecar = await start_sidecar(base_config(fake_model.url))
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    one = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + one * (1024 * 1024 // len(one)))
        await asyncio.wait_for(entered.wait(), 5)  # the read was parsed by then
        (conn,) = sidecar.running._main.connections
        queued = len(conn._queue or ())
        gate.set()
        raw = await _read_until_close(reader, 10)
    finally:
        gate.set()
        writer.close()
    assert queued <= 32
    statuses = [int(part[:3]) for part in raw.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200] * (1 + queued) + [400]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_client_still_sending_a_refused_body_reads_the_refusal(
    fake_model: FakeModel, start_sidecar: StartSidecar, framing: str
) -> None:
    """An upload over the limit is answered 413 and the connection closed with the
    rest of the body unread: the kernel then resets the connection, and the client,
    still writing, never read its 413 (a reset drops what it had not read). Like
    NGINX's lingering close, the sidecar now ends its side and reads on for a while."""
    sidecar = await start_sidecar(base_config(fake_model.url))  # 1 MiB limit
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    body = b"a" * (4 * 1024 * 1024)
    if framing == "chunked":
        head = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body)
    else:
        head = b"Content-Length: %d\r\n\r\n" % len(body)
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\n" + head)
    try:
        writer.write(body)
        await asyncio.wait_for(writer.drain(), 10)
    except ConnectionError:
        pass
    try:
        raw = await _read_until_close(reader, 10)
    except ConnectionError as exc:
        raw = repr(exc).encode()
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
    _, payload = status_and_body(raw)
    assert orjson.loads(payload)["error"]["type"] == "body_too_large"


async def test_an_http_1_0_client_gets_no_100_continue(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """RFC 9110 section 10.1.1: a server MUST ignore a 100-continue expectation in an
    HTTP/1.0 request; the sidecar sent 'HTTP/1.1 100 Continue' to a 1.0 client."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(
            b"POST /x HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            early = await asyncio.wait_for(reader.read(65536), 0.5)
            assert b"100 Continue" not in early
        writer.write(b"abcd")
        await writer.drain()
        raw = await _read_until_close(reader, 5)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.0 200 ")
    assert b"100 Continue" not in raw
    assert fake_model.hits_for("/x")[0].body == b"abcd"


async def test_a_request_with_two_host_fields_is_refused(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """RFC 9112 section 3.2: more than one Host field is a 400. It was forwarded, the
    sidecar's X-Forwarded-Host naming the first and the upstream free to read either."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    raw = await raw_request(
        sidecar.running.main_port,
        b"GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    status, payload = status_and_body(raw)
    assert status == 400
    assert orjson.loads(payload)["error"]["request_id"]
    assert fake_model.hits_for("/x") == []


@pytest.mark.parametrize("whole", [True, False], ids=["read-whole", "streamed"])
async def test_a_close_delimited_answer_cut_by_a_reset_is_not_passed_on_as_complete(
    start_sidecar: StartSidecar, whole: bool
) -> None:
    """A body that runs until the upstream closes ends at a clean close (FIN); a reset
    (RST) in the middle of it means it was cut short (RFC 9112 section 8). The sidecar
    took any end of the connection for the end of the body and relayed it as whole."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart-of-the-body")
        await writer.drain()
        if not whole:
            await asyncio.sleep(0.2)  # the head and a part are relayed before the reset
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # closed with SO_LINGER 0: a reset

    async with raw_upstream(script) as (url, _):
        sidecar = await start_sidecar(upstream_config(url), wait_ready=False)
        raw = await raw_request(
            sidecar.running.main_port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    head, _, body = raw.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 200 "):
        # Begun: it must be cut without its last chunk, never ended as complete.
        assert b"Transfer-Encoding: chunked" in head
        assert not body.endswith(b"0\r\n\r\n")
    else:
        assert head.startswith(b"HTTP/1.1 502 ")


async def test_an_http_1_0_request_with_transfer_encoding_closes_the_connection(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """RFC 9112 section 6.1: Transfer-Encoding in an HTTP/1.0 message means its framing
    is faulty (a 1.0 hop may have passed it on unread): close after answering, even when
    the client asked for keep-alive. The sidecar kept the connection open for more."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(
            b"POST /x HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        await writer.drain()
        raw = await _read_until_close(reader, 5)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.0 200 ")
    assert b"\r\nConnection: close" in raw.partition(b"\r\n\r\n")[0]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/2.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/2.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello",
        # The first head's "HTTP/1.1" says nothing of the final answer's version.
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/2.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["plain", "keep-alive", "after-100"],
)
async def test_an_answer_in_another_http_version_becomes_our_502(
    start_sidecar: StartSidecar, answer: bytes
) -> None:
    """An upstream that answers 'HTTP/2.0 200' is not speaking HTTP/1.x to us: its
    framing cannot be trusted. It was relayed as a 200."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader, writer)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    async with raw_upstream(script) as (url, _):
        sidecar = await start_sidecar(upstream_config(url), wait_ready=False)
        raw = await raw_request(
            sidecar.running.main_port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    assert raw.startswith(b"HTTP/1.1 502 ")


async def test_an_upstream_that_answers_before_reading_the_body_is_not_reused(
    start_sidecar: StartSidecar,
) -> None:
    """A model that answers (413) at once, keeping the connection, while the body is
    still being written to it: the connection went back to the pool with the rest of
    the body queued, the next client's request was written behind it, and the model,
    taking the rest of the body for requests, answered that client with the answer
    to a request the body smuggled. Like NGINX (no keep-alive unless the request
    body was sent) it is not reused."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        head = await read_head(reader, writer)
        if head.startswith(b"POST"):
            writer.write(answer(b"too large", status=b"413 Payload Too Large"))
            await writer.drain()
            # A naive server reads on: the body's bytes become its next requests, the
            # first answered when the real next one comes (a slow model's order).
            seen = b""
            while b"GET /next" not in seen:
                data = await reader.read(1024 * 1024)
                if not data:
                    return
                seen = seen[-64:] + data
            writer.write(answer(b"SMUGGLED"))
        else:
            writer.write(answer(b"fresh"))
        await writer.drain()
        await reader.read()

    async with raw_upstream(script) as (url, _):
        config = upstream_config(url, max_body_size="16MiB", max_buffered_bodies="64MiB")
        sidecar = await start_sidecar(config, wait_ready=False)
        port = sidecar.running.main_port
        body = smuggled * (12 * 1024 * 1024 // len(smuggled))  # more than socket buffers take
        raw = await raw_request(
            port,
            b"POST /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body,
        )
        assert raw.startswith(b"HTTP/1.1 413 "), raw[:100]
        raw = await raw_request(port, b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_and_body(raw) == (200, b"fresh")


@pytest.mark.parametrize("cut", ["model-breaks-off", "drain-ends"])
async def test_a_stream_cut_short_for_an_http_1_0_client_ends_in_a_reset(
    start_sidecar: StartSidecar, cut: str
) -> None:
    """An HTTP/1.0 client reads a streamed answer (no length) until the connection
    closes, so a clean close (FIN) says the answer is whole. A stream cut short (the
    model broke it off, or the drain time ran out on a stop) was closed cleanly all the
    same: the client took the fragment for the whole answer. It is reset instead, as
    the sidecar's own client reads a reset from an upstream (RFC 9112 section 8)."""
    relayed = asyncio.Event()  # the client has read the first event

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader, writer)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nb\r\ndata: one\n\n\r\n"
        )
        await writer.drain()
        if cut == "model-breaks-off":
            await asyncio.wait_for(relayed.wait(), 5)
            writer.write(b"zz\r\n")  # not a chunk size: the answer is broken
            await writer.drain()
        await reader.read()

    async with raw_upstream(script) as (url, _):
        config = upstream_config(url, drain_timeout="200ms")
        sidecar = await start_sidecar(config, wait_ready=False)
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
        try:
            writer.write(b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.0 200 ")
            assert b"content-length" not in head.lower()  # read until the close
            assert await asyncio.wait_for(reader.readexactly(11), 5) == b"data: one\n\n"
            relayed.set()
            if cut == "drain-ends":
                await sidecar.running.stop()
            with pytest.raises(ConnectionResetError):
                await _read_until_close(reader, 5)
        finally:
            writer.close()
