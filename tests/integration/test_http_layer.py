"""The sidecar's own HTTP/1.1 server and client, on raw sockets: hostile clients
(fat heads, trickling heads and bodies, readers that stop) and hostile upstreams
(stray answers, broken status lines, connections closed under a request)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from sidecar.http.client import Pool
from sidecar.http.messages import Answer, Response
from sidecar.http.server import HttpServer, Limits, Request, RequestRefused
from sidecar.pipeline.auth import hash_key
from tests.conftest import (
    LOOPBACK,
    FakeModel,
    GatedHandler,
    StartSidecar,
    base_config,
    clients_that_sent,
    raw_request,
)
from tests.integration.test_correctness import ListSink, flushed
from tests.integration.test_endpoints import metric_value

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(script: Script) -> AsyncIterator[tuple[str, list[int]]]:
    """A model server that writes whatever ``script`` says; ``script`` gets each
    connection and its number. Yields its URL and the list of connection numbers."""
    seen: list[int] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(len(seen))
        try:
            await script(reader, writer, seen[-1])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{LOOPBACK}:{port}", seen
    finally:
        server.close()


async def read_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The next request's head that is not a readiness probe (probes get a 200)."""
    while True:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if b" /v2/health/" not in head.split(b"\r\n", 1)[0]:
            return head
        writer.write(answer(b"ready"))
        await writer.drain()


def answer(body: bytes, *, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: text/plain\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def upstream_config(url: str, **server: Any) -> dict[str, Any]:
    config = base_config(url)
    # No probes: a raw upstream answers only what its script says.
    config["upstreams"]["model"]["health"] = {"interval": "60s", "timeout": "1s"}
    config["server"].update(server)
    return config


async def metric(sidecar: Any, name: str, **labels: str) -> float:
    """A series' value from the admin listener's /metrics (0 when absent)."""
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        return metric_value(await resp.text(), name, **labels)


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- hostile upstreams -------------------------------------------------------------


@pytest.mark.parametrize("late", [False, True], ids=["with-the-answer", "while-idle"])
async def test_a_stray_answer_from_the_upstream_never_reaches_another_client(
    start_sidecar: StartSidecar, late: bool
) -> None:
    stray_written = asyncio.Event()
    served = 0
    used: set[int] = set()  # connections that carried a request (probes have their own)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        nonlocal served
        while True:
            await read_head(reader, writer)
            used.add(conn)
            served += 1
            own = answer(b"answer-%d" % served)
            stray = answer(b"STRAY")
            if served == 1 and not late:
                writer.write(own + stray)  # two answers to one request
            else:
                writer.write(own)
            await writer.drain()
            if served == 1 and late:
                writer.write(stray)  # an answer nobody asked for, on an idle connection
                await writer.drain()
            stray_written.set()

    async with raw_upstream(script) as (url, _):
        sidecar = await start_sidecar(upstream_config(url), wait_ready=False)
        pool = sidecar.running.runtime.upstreams["model"].pool
        async with sidecar.session.get(sidecar.url + "/one") as resp:
            assert await resp.read() == b"answer-1"
        await asyncio.wait_for(stray_written.wait(), 5)
        for _ in range(500):  # until the sidecar has read the stray bytes (5 s at most)
            if pool.stray:
                break
            await asyncio.sleep(0.01)
        assert pool.stray == 1
        async with sidecar.session.get(sidecar.url + "/two") as resp:
            assert await resp.read() == b"answer-2"
        assert len(used) == 2  # the out-of-step connection was never reused
        assert await metric(sidecar, "sidecar_upstream_stray_total", upstream="model") == 1


async def test_a_stray_answer_to_a_readiness_probe_is_counted_too(
    start_sidecar: StartSidecar,
) -> None:
    # Probes have a pool of their own; its strays are the upstream's all the same.
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while True:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(answer(b"ready") + answer(b"STRAY"))
            await writer.drain()

    async with raw_upstream(script) as (url, _):
        sidecar = await start_sidecar(upstream_config(url), wait_ready=False)
        for _ in range(500):  # until the first probe's stray has been read (5 s at most)
            if await metric(sidecar, "sidecar_upstream_stray_total", upstream="model"):
                break
            await asyncio.sleep(0.01)
        assert await metric(sidecar, "sidecar_upstream_stray_total", upstream="model") == 1


@pytest.mark.parametrize(
    ("status_line", "why"),
    [
        (b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n", "status beyond 599"),
        (b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n", "control byte in the reason"),
        (b"HTTP/1.1 200 OK\x7f\r\nContent-Length: 0\r\n\r\n", "DEL in the reason"),
        (b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n", "NUL in the reason"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "an upgrade nobody asked for",
        ),
        (b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n", "a two-digit status"),
        (b"NOT HTTP AT ALL\r\n\r\n", "not HTTP"),
    ],
)
async def test_a_broken_status_line_becomes_our_502(
    start_sidecar: StartSidecar, status_line: bytes, why: str
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader, writer)
        writer.write(status_line)
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_upstream(script) as (url, _):
        sink = ListSink()
        sidecar = await start_sidecar(
            upstream_config(url), wait_ready=False, log_sinks={"access": sink}
        )
        raw = await raw_request(
            sidecar.running.main_port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 502 "), why
        body = orjson.loads(raw.partition(b"\r\n\r\n")[2])
        assert body["error"]["type"] == "upstream_error"
        (record,) = await flushed(sidecar, sink, 1)
        assert record["status"] == 502


async def test_a_reason_phrase_with_tabs_and_obs_text_is_relayed(
    start_sidecar: StartSidecar,
) -> None:
    # RFC 9112 section 4 allows tab, space, visible bytes and obs-text (0x80-0xFF).
    reason = b"All\tGood \xe9t\xe9 ~"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader, writer)
        writer.write(b"HTTP/1.1 299 " + reason + b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_upstream(script) as (url, _):
        sidecar = await start_sidecar(upstream_config(url), wait_ready=False)
        raw = await raw_request(
            sidecar.running.main_port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 299 " + reason + b"\r\n")
        assert raw.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"],
    ids=["103", "100"],
)
async def test_informational_answers_are_skipped_and_the_final_one_relayed(
    start_sidecar: StartSidecar, interim: bytes
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader, writer)
        writer.write(interim + answer(b"final"))
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_upstream(script) as (url, _):
        sidecar = await start_sidecar(upstream_config(url), wait_ready=False)
        async with sidecar.session.get(sidecar.url + "/x") as resp:
            assert resp.status == 200
            assert await resp.read() == b"final"


async def test_an_answer_cut_before_its_length_is_never_passed_on_as_complete(
    start_sidecar: StartSidecar,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-ten-b")
        await writer.drain()

    async with raw_upstream(script) as (url, _):
        sidecar = await start_sidecar(upstream_config(url), wait_ready=False)
        raw = await raw_request(
            sidecar.running.main_port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, body = status_and_body(raw)
        # Either our 502 (nothing had been sent yet), never a 200 with a short body.
        assert status == 502
        assert b"only-ten-b" not in body


@pytest.mark.parametrize(
    ("method", "retryable", "expected"),
    [("GET", False, 200), ("POST", True, 200), ("POST", False, 502)],
)
async def test_a_kept_alive_connection_closed_under_a_request_is_replayed_only_when_safe(
    start_sidecar: StartSidecar, method: str, retryable: bool, expected: int
) -> None:
    served = 0
    dropped = False

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        nonlocal served, dropped
        on_this_connection = 0
        while True:
            await read_head(reader, writer)
            on_this_connection += 1
            if on_this_connection == 2 and not dropped:
                # Read the request, then close unanswered: what a server does when
                # its keep-alive timeout races the request.
                dropped = True
                return
            served += 1
            writer.write(answer(b"first" if served == 1 else b"fresh"))
            await writer.drain()

    async with raw_upstream(script) as (url, _):
        config = upstream_config(url)
        config["routes"][0]["retryable"] = retryable
        config["routes"][0]["retry"] = {"attempts": 1}
        sidecar = await start_sidecar(config, wait_ready=False)
        async with sidecar.session.request(method, sidecar.url + "/x") as resp:
            assert await resp.read() == b"first"
        async with sidecar.session.request(method, sidecar.url + "/x") as resp:
            assert resp.status == expected
            if expected == 200:
                assert await resp.read() == b"fresh"
        assert dropped
        assert served == (2 if expected == 200 else 1)
        replayed = await metric(sidecar, "sidecar_upstream_replayed_total", upstream="model")
        assert replayed == (1 if expected == 200 else 0)


@pytest.mark.parametrize("case", ["fresh-connection", "answer-begun"])
async def test_no_replay_on_a_fresh_connection_nor_once_the_answer_began(
    start_sidecar: StartSidecar, case: str
) -> None:
    """A request is sent again only when a kept-alive connection closed before any
    byte of its answer (the upstream's keep-alive timeout raced it): not when a
    fresh connection closes unanswered (the upstream itself fails), nor once part
    of the answer came (the upstream may have acted on it)."""
    requests = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        nonlocal requests
        while True:
            await read_head(reader, writer)
            requests += 1
            if case == "fresh-connection" and requests == 1:
                return  # closed unanswered
            if case == "answer-begun" and requests == 2:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-")
                await writer.drain()
                return  # closed in the middle of the answer's head
            writer.write(answer(b"answer-%d" % requests))
            await writer.drain()

    async with raw_upstream(script) as (url, _):
        config = upstream_config(url)
        config["routes"][0]["retry"] = {"attempts": 1}
        sidecar = await start_sidecar(config, wait_ready=False)
        if case == "answer-begun":
            async with sidecar.session.get(sidecar.url + "/x") as resp:
                assert await resp.read() == b"answer-1"
        async with sidecar.session.get(sidecar.url + "/x") as resp:
            assert resp.status == 502
        assert requests == (2 if case == "answer-begun" else 1)
        assert await metric(sidecar, "sidecar_upstream_replayed_total", upstream="model") == 0


# -- hostile clients ---------------------------------------------------------------


async def test_a_fat_head_is_refused_431_without_being_kept(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    port = sidecar.running.main_port
    field = b"X-Fat: " + b"a" * 7000 + b"\r\n"
    raw = await raw_request(port, b"GET /x HTTP/1.1\r\nHost: x\r\n" + field * 6 + b"\r\n")
    status, body = status_and_body(raw)
    assert status == 431
    assert orjson.loads(body)["error"]["type"] == "header_too_large"
    many = b"".join(b"X-F%d: 1\r\n" % i for i in range(150))
    status, _ = status_and_body(await raw_request(port, b"GET /x HTTP/1.1\r\n" + many + b"\r\n"))
    assert status == 431
    # A head that never ends is refused once it passes the limit, not buffered on.
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"GET /x HTTP/1.1\r\nX-Endless: ")
    refused = b""
    for _ in range(64):
        try:
            writer.write(b"b" * 4096)
            await writer.drain()
        except ConnectionError:
            break
        with contextlib.suppress(TimeoutError):
            refused += await asyncio.wait_for(reader.read(65536), 0.01)
        if refused:
            break
    if not refused:
        refused = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert refused.startswith(b"HTTP/1.1 431 ")
    assert fake_model.hits_for("/x") == []


async def test_head_limits_hold_at_their_edges(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Each head limit at its edge (defaults: 100 fields, 8 KiB a line, 32 KiB a
    head): the 100th field passes and the 101st is refused; the request line counts
    toward the head's size; a field that has not ended yet is refused as soon as it
    passes 8 KiB, not held until head_timeout."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    port = sidecar.running.main_port
    hundred = b"Host: x\r\nConnection: close\r\n" + b"".join(b"X-F%d: 1\r\n" % i for i in range(98))
    raw = await raw_request(port, b"GET /hundred HTTP/1.1\r\n" + hundred + b"\r\n")
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:100]
    raw = await raw_request(port, b"GET /more HTTP/1.1\r\n" + hundred + b"X-F98: 1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:100]
    # Fields of 26 KB behind a 7 KB target: 33 KB, past the head limit together.
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 6500) for i in range(4))
    target = b"/long?" + b"q" * 7000
    raw = await raw_request(
        port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fields + b"\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:100]
    # A field still arriving: its first 9000 bytes, in a read of their own.
    server = sidecar.running._main
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"GET /unended HTTP/1.1\r\nHost: x\r\nX-Long: ")
        for _ in range(500):  # bounded: until the head's start has been read
            if any(conn._in_head for conn in server.connections):
                break
            await asyncio.sleep(0.01)
        writer.write(b"a" * 9000)
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 431 "), raw[:100]
    assert [hit.path for hit in fake_model.hits] == ["/hundred"]


async def test_bodies_held_by_all_requests_together_are_bounded_and_refusals_answered(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Each request body is read whole before it is sent on: clients that send large
    bodies slowly (or never end them) must not hold more than
    server.max_buffered_bodies between them (twenty 10 MiB bodies held 272 MB of a
    192 Mi pod). Past it a request is refused 503 at once, in the route's shape;
    small requests still pass, and what a request held is let go when it ends."""
    config = base_config(fake_model.url)
    config["server"].update(max_buffered_bodies="1MiB", max_body_size="512KiB")
    sidecar = await start_sidecar(config)
    port = sidecar.running.main_port
    server = sidecar.running._main
    kib = 1024

    async def begin(length: int, sent: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length)
        writer.write(b"a" * sent)
        await writer.drain()
        return reader, writer

    async def until_held(count: int) -> None:
        for _ in range(500):  # bounded: 5 s
            if server.body_bytes >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"held {server.body_bytes}, expected {count}")

    first = await begin(400 * kib, 300 * kib)
    second = await begin(400 * kib, 300 * kib)
    await until_held(600 * kib)
    # Declared larger than what is left: refused before its body is sent.
    status, body = status_and_body(
        await raw_request(
            port, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (500 * kib)
        )
    )
    assert status == 503
    error = orjson.loads(body)["error"]
    assert error["type"] == "overloaded"
    assert "server.max_buffered_bodies" in error["message"]
    assert error["request_id"]
    # A chunked body (no length declared) is refused when it passes the budget.
    chunk = b"b" * (100 * kib)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))
    raw = await raw_request(
        port,
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n" + chunked + b"0\r\n\r\n",
    )
    assert status_and_body(raw)[0] == 503
    # A small request still passes.
    async with sidecar.session.post(sidecar.url + "/x", data=b'{"a": 1}') as resp:
        assert resp.status == 200
    assert await metric(sidecar, "sidecar_dropped_total", buffer="request_bodies") == 2
    # The held bodies end and are answered; what they held is let go.
    for reader, writer in (first, second):
        writer.write(b"a" * (100 * kib))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.close()
    assert [hit.body and len(hit.body) for hit in fake_model.hits_for("/x")][-2:] == [400 * kib] * 2
    for _ in range(500):
        if server.body_bytes == 0:
            break
        await asyncio.sleep(0.01)
    assert server.body_bytes == 0
    raw = await raw_request(
        port,
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (500 * kib) + b"c" * (500 * kib),
    )
    assert status_and_body(raw)[0] == 200


async def test_unfinished_heads_held_by_all_connections_are_bounded(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Each connection may hold a head of max_head_size for head_timeout: 3,000
    connections sending 31 KB heads slowly took the process from 66 to 168 MB. Past
    server.max_buffered_heads a head is refused 503, and its bytes let go at once
    (92 MB for the same 3,000)."""
    config = base_config(fake_model.url)
    config["server"].update(max_buffered_heads="64KiB", max_head_size="32KiB")
    sidecar = await start_sidecar(config)
    port = sidecar.running.main_port
    server = sidecar.running._main
    fields = b"".join(b"X-F%d: %s\r\n" % (k, b"v" * 7000) for k in range(3))

    async def begin() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n" + fields)
        await writer.drain()
        return reader, writer

    held = []
    for count in range(1, 4):
        held.append(await begin())
        for _ in range(500):  # bounded: 5 s
            if server.head_bytes >= count * len(fields):
                break
            await asyncio.sleep(0.01)
        assert server.head_bytes >= count * len(fields)
    refused = await begin()
    raw = await asyncio.wait_for(refused[0].read(), 10)
    status, body = status_and_body(raw)
    assert status == 503
    error = orjson.loads(body)["error"]
    assert (error["type"], "server.max_buffered_heads" in error["message"]) == ("overloaded", True)
    refused[1].close()
    assert await metric(sidecar, "sidecar_dropped_total", buffer="request_heads") == 1
    for reader, writer in held:  # the held heads end, and are answered
        writer.write(b"\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.close()
    assert server.head_bytes == 0
    reader, writer = await begin()
    writer.write(b"Connection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_heads_and_bodies_that_trickle_are_cut_off_with_408(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sink = ListSink()
    config = base_config(fake_model.url)
    config["server"].update(head_timeout="300ms", body_timeout="300ms")
    sidecar = await start_sidecar(config, log_sinks={"access": sink})
    port = sidecar.running.main_port
    raw = await raw_request(port, b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert raw.startswith(b"HTTP/1.1 408 ")
    raw = await raw_request(
        port, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-some"
    )
    status, body = status_and_body(raw)
    assert status == 408
    error = orjson.loads(body)["error"]
    assert error["type"] == "request_timeout"
    # Silence, not slowness (the default body_min_rate is on): said so.
    assert error["message"] == "no bytes of the request body arrived for 0.3s"
    assert fake_model.hits_for("/x") == []
    records = await flushed(sidecar, sink, 2)
    assert sorted(r["status"] for r in records) == [408, 408]


async def trickle_body(
    port: int, head: bytes, pieces: list[bytes], every: float
) -> tuple[bytes, int]:
    """Send ``head``, then ``pieces`` one each ``every`` seconds until the sidecar
    answers; what came back and how many pieces went out."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    answer = asyncio.ensure_future(asyncio.wait_for(reader.read(), 20))
    sent = 0
    try:
        writer.write(head)
        for piece in pieces:
            await asyncio.wait([answer], timeout=every)
            if answer.done():
                break
            writer.write(piece)
            sent += 1
        return await answer, sent
    finally:
        answer.cancel()
        writer.close()


async def test_a_body_slower_than_body_min_rate_is_cut_off_while_one_at_that_rate_passes(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Silence alone is not enough: a client sending a byte every 100 ms is never
    silent for body_timeout, yet holds its share of the bodies' budget for as long
    as it likes. The whole body may take body_timeout and a second a body_min_rate
    bytes; a body that arrives faster passes even when it takes longer than
    body_timeout."""
    config = base_config(fake_model.url)
    config["server"].update(body_timeout="500ms", body_min_rate="100B/s")
    sidecar = await start_sidecar(config)
    port = sidecar.running.main_port
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
    raw, sent = await trickle_body(port, head % 60, [b"a"] * 60, 0.1)
    status, body = status_and_body(raw)
    assert status == 408
    error = orjson.loads(body)["error"]
    assert "server.body_min_rate" in error["message"], error
    assert sent < 30  # the allowance (0.5 s and 10 ms a byte) ran out near the 6th
    assert fake_model.hits_for("/x") == []

    raw, sent = await trickle_body(port, head % 1000, [b"b" * 100] * 10, 0.1)
    assert status_and_body(raw)[0] == 200, raw
    assert sent == 10  # a second at 1,000 bytes/s: longer than body_timeout, passed
    assert [hit.body for hit in fake_model.hits_for("/x")] == [b"b" * 1000]


async def test_a_body_sent_fast_then_trickled_does_not_bank_time_for_the_trickle(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A body's fast start earned a second a body_min_rate bytes without a cap: sent
    fast up to its last bytes, those could then come a byte every few seconds for
    hours (1 MiB at 500B/s: 35 minutes), the body holding the most of
    max_buffered_bodies the longest (four such 1 MiB bodies kept a 4 MiB budget
    full, every other POST answered 503). What a part earns is never more than
    body_timeout ahead of now."""
    config = base_config(fake_model.url)
    config["server"].update(body_timeout="500ms", body_min_rate="1KiB/s")
    sidecar = await start_sidecar(config)
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100020\r\n\r\n"
    # 100,000 bytes at once once the body is awaited (97 s at 1 KiB/s), then a
    # byte every 200 ms: never silent for body_timeout, 5 bytes a second.
    pieces = [b"a" * 100_000] + [b"a"] * 20
    raw, sent = await trickle_body(sidecar.running.main_port, head, pieces, 0.2)
    status, body = status_and_body(raw)
    assert status == 408, raw[:200]
    assert "server.body_min_rate" in orjson.loads(body)["error"]["message"]
    assert sent < 8  # cut about body_timeout after the fast part (not after 97 s)
    assert fake_model.hits_for("/x") == []


async def test_a_client_that_stops_reading_releases_its_upstream_connection(
    start_sidecar: StartSidecar,
) -> None:
    """A streamed answer to a client that reads nothing: the sidecar holds a bounded
    amount, cuts the client off after send_timeout and frees the upstream slot."""
    written = 0
    blocked = asyncio.Event()
    used: set[int] = set()  # connections that carried a request (probes have their own)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        nonlocal written
        while True:
            head = await read_head(reader, writer)
            used.add(conn)
            if b"/small" in head:
                writer.write(answer(b"small"))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"x" * 65536
            for _ in range(4096):  # up to 256 MiB, far more than any buffer
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                try:
                    await asyncio.wait_for(writer.drain(), 0.3)
                except TimeoutError:
                    blocked.set()  # the sidecar stopped reading from us
                    await writer.drain()
                written += len(chunk)
            return

    async with raw_upstream(script) as (url, _):
        config = upstream_config(url, send_timeout="2s")
        config["upstreams"]["model"]["max_connections"] = 1
        sidecar = await start_sidecar(config, wait_ready=False)
        _, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(blocked.wait(), 10)  # flow control reached the model
        assert written < 32 * 1024 * 1024
        # The only upstream slot is freed once the stalled client is cut off.
        async with sidecar.session.get(sidecar.url + "/small") as resp:
            assert resp.status == 200
            assert await resp.read() == b"small"
        assert sidecar.running._main.slow_readers == 1
        assert await metric(sidecar, "sidecar_slow_clients_total") == 1
        writer.close()
        assert len(used) == 2


async def test_pipelined_requests_wait_while_the_answers_before_them_are_unread(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A client that pipelines requests for large answers and reads none of them: the
    next request waits until the answers before it have gone out (at most a write
    buffer over the last answer held), it is not sent upstream with its answer
    piled onto the others in memory."""
    blob = b"x" * (256 * 1024)  # the largest answer written whole

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=blob)

    fake_model.on("/blob", large)
    sidecar = await start_sidecar(base_config(fake_model.url))
    server = sidecar.running._main
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing: fills soon
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, sidecar.running.main_port))
    _, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n" * 33)  # 8 MiB of answers
        for _ in range(500):  # bounded: until the answers wait for the client
            if any(conn._drain_waiter is not None for conn in server.connections):
                break
            await asyncio.sleep(0.01)
        (conn,) = server.connections
        assert conn._drain_waiter is not None
        assert conn._transport is not None
        assert conn._transport.get_write_buffer_size() <= len(blob) + 64 * 1024
        assert len(fake_model.hits_for("/blob")) < 33
    finally:
        writer.close()


async def test_a_body_its_handler_has_not_asked_for_is_read_ahead_only_so_far() -> None:
    """Until the handler reads a request's body, the server reads at most read_ahead
    of it and then stops reading: a client cannot push its whole body into memory
    ahead of a handler that is busy (with the head's checks, or waiting for an
    upstream slot). Reading resumes when the handler asks for the body."""
    gate = asyncio.Event()

    async def handle(request: Request) -> Answer:
        await gate.wait()
        body = await request.read_body(8 * 1024 * 1024)
        return Response(200, b"%d" % len(body))

    def refuse(refusal: RequestRefused, method: str, target: str, peer: str) -> Response:
        return Response(refusal.status, refusal.message.encode(), close=True)

    read_ahead = 64 * 1024
    server = HttpServer(handle, refuse, Limits(read_ahead=read_ahead))
    port = await server.listen(LOOPBACK, 0)
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        body = b"a" * (4 * 1024 * 1024)
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        for _ in range(500):  # bounded: until the server stops reading
            if any(conn._reading_paused for conn in server.connections):
                break
            await asyncio.sleep(0.01)
        assert any(conn._reading_paused for conn in server.connections)
        assert server.body_bytes <= read_ahead + 256 * 1024  # and what one read took
        gate.set()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        gate.set()
        writer.close()
        await server.stop(1)
    assert status_and_body(raw) == (200, b"%d" % len(body))


async def test_a_client_that_leaves_cancels_its_upstream_call(
    start_sidecar: StartSidecar,
) -> None:
    entered = asyncio.Event()
    closed = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader, writer)
        entered.set()
        await reader.read()  # never answers; returns when the sidecar hangs up
        closed.set()

    async with raw_upstream(script) as (url, _):
        sink = ListSink()
        sidecar = await start_sidecar(
            upstream_config(url), wait_ready=False, log_sinks={"access": sink}
        )
        _, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(entered.wait(), 5)
        writer.close()
        # The route's 5 s timeout has not passed: the sidecar hung up on the model
        # because nobody waits for the answer any more.
        await asyncio.wait_for(closed.wait(), 3)
        (record,) = await flushed(sidecar, sink, 1)
        assert (record["status"], record["outcome"]) == (499, "client_closed")
        pool = sidecar.running.runtime.upstreams["model"].pool
        assert pool.open == pool.idle_count  # nothing left busy


# -- the protocol ------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(text="slow")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    fake_model.on("/slow", slow)
    fake_model.on("/fast", fast)
    sidecar = await start_sidecar(base_config(fake_model.url))
    raw = await raw_request(
        sidecar.running.main_port,
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.index(b"slow") < raw.index(b"fast")


async def test_a_pipelined_request_reads_its_body_when_its_turn_comes(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A request pipelined behind one being answered waits with reading paused; its
    body, sent after its head, must be read once its turn comes (not left unread
    until body_timeout)."""
    slow = GatedHandler()
    gate, entered = slow.gate, slow.entered
    fake_model.on("/slow", slow)
    sidecar = await start_sidecar(base_config(fake_model.url))
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(
            b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /late HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\n"
        )
        await asyncio.wait_for(entered.wait(), 5)  # both heads were parsed by then
        (conn,) = sidecar.running._main.connections
        assert conn._reading_paused  # the POST waits its turn, unread
        writer.write(b"hello")
        gate.set()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        gate.set()
        writer.close()
    assert raw.count(b"HTTP/1.1 200 OK") == 2, raw[:300]
    assert fake_model.hits_for("/late")[0].body == b"hello"


@pytest.mark.parametrize(
    ("first", "version"),
    [
        # A request that says close, and a client that sends more all the same.
        (b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"1.1"),
        # A kept-alive HTTP/1.0 client whose answer is streamed: ended by closing.
        (b"GET /events HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", b"1.0"),
    ],
    ids=["connection-close", "http-1.0-streamed"],
)
async def test_closing_with_pipelined_bytes_unread_does_not_reset_the_answer(
    fake_model: FakeModel, start_sidecar: StartSidecar, first: bytes, version: bytes
) -> None:
    """A connection that closes after its answer, with more pipelined behind it than
    one read takes: closing with those bytes unread resets the connection, and the
    reset destroys the answer before the client reads it. The sidecar ends its side
    and reads on (lingering close), so the answer arrives whole."""

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await response.write_eof()
        return response

    fake_model.on("/events", events)
    sidecar = await start_sidecar(base_config(fake_model.url))
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(
            first + b"POST /next HTTP/" + version + b"\r\nHost: x\r\nConnection: keep-alive\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"a" * 1_000_000
        )
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/" + version + b" 200 OK"), raw[:100]
    if version == b"1.0":
        assert body == b"data: one\n\n"
    else:
        assert orjson.loads(body)["path"] == "/first"
    assert fake_model.hits_for("/next") == []


async def _one_answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    return head + await asyncio.wait_for(reader.readexactly(length), 10)


async def test_a_kept_alive_connection_reuses_its_task_and_an_idle_one_holds_none(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Between requests a connection's task waits for the next one until the server's
    sweeper next runs, then ends: a busy client's requests share one task, an idle
    one holds none, and a request that comes as the wait ends is answered all the
    same."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    server = sidecar.running._main
    request = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(request)
        assert (await _one_answer(reader)).startswith(b"HTTP/1.1 200 OK")
        (conn,) = server.connections
        waiting = conn._task
        assert waiting is not None  # parked for the next request
        writer.write(request)
        assert (await _one_answer(reader)).startswith(b"HTTP/1.1 200 OK")
        assert conn._task is waiting
        for _ in range(300):  # bounded: a tick of the sweeper (0.5 s here)
            if conn._task is None:
                break
            await asyncio.sleep(0.01)
        assert conn._task is None  # idle: no task held
        assert waiting.done()
        writer.write(request)
        assert (await _one_answer(reader)).startswith(b"HTTP/1.1 200 OK")
        assert conn._task is not None
        # The wait ends and a request comes before the task has run again: it is
        # served (queued for the ending task), not left unanswered.
        conn._end_wait()
        conn.data_received(request)
        assert (await _one_answer(reader)).startswith(b"HTTP/1.1 200 OK")
        writer.write(request)  # and the connection goes on as before
        assert (await _one_answer(reader)).startswith(b"HTTP/1.1 200 OK")
        # The same, with a malformed request behind it in the same read: the request
        # is answered first, then the refusal, and the connection closes.
        conn._end_wait()
        conn.data_received(request + b"GARBAGE\x01\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 10)
        assert rest.startswith(b"HTTP/1.1 200 OK"), rest
        assert rest.count(b"HTTP/1.1 400 Bad Request") == 1
        assert rest.index(b"HTTP/1.1 400") > rest.index(b"HTTP/1.1 200")
        assert len(fake_model.hits_for("/one")) == 6
    finally:
        writer.close()


async def test_a_request_begun_before_the_stop_is_answered_and_an_idle_connection_closed(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """At shutdown a connection whose request head had partly arrived was closed as
    if idle: the client saw EOF mid-request and could not tell whether its POST was
    processed. Such a connection is in flight: the rest of the request arrives, is
    answered (Connection: close), then the connection closes. One idle between
    requests is closed at once."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    server = sidecar.running._main
    port = sidecar.running.main_port
    idle_reader, idle_writer = await asyncio.open_connection(LOOPBACK, port)
    fresh_reader, fresh_writer = await asyncio.open_connection(LOOPBACK, port)
    kept_reader, kept_writer = await asyncio.open_connection(LOOPBACK, port)
    writers = (idle_writer, fresh_writer, kept_writer)
    stopping = None
    try:
        request = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        for reader, writer in ((idle_reader, idle_writer), (kept_reader, kept_writer)):
            writer.write(request)
            assert (await _one_answer(reader)).startswith(b"HTTP/1.1 200 OK")
        # A first request on a fresh connection, and the next one on a kept-alive
        # connection: half a head each.
        fresh_writer.write(b"POST /fresh HTTP/1.1\r\nHost: x\r\nContent-Le")
        kept_writer.write(b"POST /kept HTTP/1.1\r\nHo")
        for _ in range(500):  # bounded: until both half heads are being parsed
            if sum(conn._in_head for conn in server.connections) == 2:
                break
            await asyncio.sleep(0.01)
        assert sum(conn._in_head for conn in server.connections) == 2

        stopping = asyncio.create_task(sidecar.running.stop())
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""  # closed at once
        assert not stopping.done()  # the two begun requests hold the drain
        fresh_writer.write(b"ngth: 4\r\n\r\nbody")
        kept_writer.write(b"st: x\r\nContent-Length: 2\r\n\r\nok")
        for reader, path, size in ((fresh_reader, "/fresh", 4), (kept_reader, "/kept", 2)):
            answer = await asyncio.wait_for(reader.read(), 10)  # to the connection's end
            head, body = answer.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 OK"), answer
            assert b"\r\nconnection: close" in head.lower()
            assert orjson.loads(body) == {"method": "POST", "path": path, "size": size}
        await asyncio.wait_for(stopping, 10)
        assert not server.connections
        assert [hit.path for hit in fake_model.hits] == ["/first", "/first", "/fresh", "/kept"]
    finally:
        for writer in writers:
            writer.close()
        if stopping is not None and not stopping.done():
            stopping.cancel()


async def test_a_head_begun_before_the_stop_that_never_ends_is_timed_out_not_waited_for(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A half head held open through the stop is still bounded by the head timeout:
    the client gets the 408, and the drain ends without waiting for drain_timeout."""
    config = base_config(fake_model.url)
    config["server"].update(head_timeout="500ms", drain_timeout="60s")
    sidecar = await start_sidecar(config)
    server = sidecar.running._main
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(b"POST /never HTTP/1.1\r\nHost: x\r\n")
        for _ in range(500):  # bounded: until the half head is being parsed
            if any(conn._in_head for conn in server.connections):
                break
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(sidecar.running.stop())
        answer = await asyncio.wait_for(reader.read(), 20)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
        assert b"\r\nconnection: close" in answer.lower()
        writer.close()
        await asyncio.wait_for(stopping, 20)  # well before the 60 s drain timeout
        assert fake_model.hits_for("/never") == []
    finally:
        writer.close()


async def test_at_most_256_tasks_wait_for_a_next_request(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Clients that each send one request and then idle leave at most 256 tasks
    waiting (bounded memory): the others' connections idle without one."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    server = sidecar.running._main
    sweeper = server._sweeper
    assert sweeper is not None
    sweeper.cancel()  # no wait ends on its own during the test
    request = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
    clients = await clients_that_sent(sidecar.running.main_port, request, 300)
    writers = [writer for _, writer in clients]
    try:
        for reader, _ in clients:
            assert (await _one_answer(reader)).startswith(b"HTTP/1.1 200 OK")
        assert server.waiting == 256
        assert sum(conn._task is not None for conn in server.connections) == 256
        for writer in writers:
            writer.close()
        # Bounded: until the server has seen every client leave and each waiting
        # task has run its cancellation (a turn of the loop after its connection's
        # end: checking the connections alone raced with it).
        for _ in range(1000):
            if not server.connections and server.waiting == 0:
                break
            await asyncio.sleep(0.01)
        assert not server.connections
        assert server.waiting == 0  # each wait ended with its connection
    finally:
        for writer in writers:
            writer.close()


async def test_versions_we_answer_and_refuse(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    port = sidecar.running.main_port
    raw = await raw_request(port, b"GET /x HTTP/2.0\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 505 ")
    # An HTTP/1.0 client is answered in 1.0 and, without keep-alive, the connection ends.
    raw = await raw_request(port, b"GET /x HTTP/1.0\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.0 200 ")
    assert b"\r\nConnection: close" in raw.partition(b"\r\n\r\n")[0]


async def test_expect_100_continue(fake_model: FakeModel, start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"abcd")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()
    assert fake_model.hits_for("/x")[0].body == b"abcd"


async def test_a_refusal_before_the_body_skips_100_continue_and_closes(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    config = base_config(fake_model.url)
    config["auth"] = {
        "enabled": True,
        "api_keys": [{"name": "someone", "digest": hash_key("another-key-0123456789")}],
    }
    sidecar = await start_sidecar(config)
    raw = await raw_request(
        sidecar.running.main_port,
        b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 401 ")
    assert b"100 Continue" not in raw
    assert b"\r\nConnection: close" in raw.partition(b"\r\n\r\n")[0]


async def test_head_204_and_304_answers_carry_no_body(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query["status"]))

    fake_model.on("/empty", empty)
    sidecar = await start_sidecar(base_config(fake_model.url))
    port = sidecar.running.main_port
    raw = await raw_request(
        port,
        b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /empty?status=204 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /empty?status=304 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    parts = raw.split(b"HTTP/1.1 ")
    statuses = [int(part[:3]) for part in parts[1:]]
    assert statuses == [200, 204, 304, 200]
    assert parts[1].endswith(b"\r\n\r\n")  # HEAD: a head only
    assert b"Content-Length: " in parts[1]
    assert parts[2].endswith(b"\r\n\r\n")
    assert b"Content-Length" not in parts[2]
    assert parts[3].endswith(b"\r\n\r\n")


async def test_a_body_sent_after_a_head_answer_never_reaches_the_next_request() -> None:
    """A HEAD answer ends at its head, but an upstream that treats HEAD as GET sends
    the body too, maybe later: the connection is never reused after a HEAD answer,
    so that body cannot become the next request's answer."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if request.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)  # the body in a later segment
                writer.write(b"stolen")
            else:
                writer.write(answer(b"after"))
            await writer.drain()

    async with raw_upstream(script) as (url, connections):
        pool = Pool(LOOPBACK, int(url.rsplit(":", 1)[1]), max_connections=1)
        try:
            head = await asyncio.wait_for(pool.request("HEAD", "/x", [], None, replayable=True), 5)
            assert (head.status, head.complete, head.content_length) == (200, True, 6)
            assert await head.read() == b""
            head.release()
            assert pool.idle_count == 0
            response = await asyncio.wait_for(
                pool.request("GET", "/x", [], None, replayable=True), 5
            )
            assert await asyncio.wait_for(response.read(), 5) == b"after"
            response.release()
            assert len(connections) == 2
        finally:
            pool.close()


async def test_an_answer_released_before_its_end_does_not_go_back_to_the_pool() -> None:
    """A connection goes back to the pool only once its answer was read to the end:
    released with part of the body still to come, it is closed, and the next request
    gets a fresh one (the rest of that body would be read as the next answer)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if request.startswith(b"GET /first "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf-")
            else:
                writer.write(answer(b"second"))
            await writer.drain()

    async with raw_upstream(script) as (url, connections):
        pool = Pool(LOOPBACK, int(url.rsplit(":", 1)[1]), max_connections=1)
        try:
            first = await asyncio.wait_for(
                pool.request("GET", "/first", [], None, replayable=True), 5
            )
            assert await asyncio.wait_for(first.read_chunk(), 5) == b"half-"
            first.release()  # the other five bytes have not come
            assert pool.idle_count == 0
            second = await asyncio.wait_for(
                pool.request("GET", "/second", [], None, replayable=True), 5
            )
            assert await asyncio.wait_for(second.read(), 5) == b"second"
            second.release()
            assert len(connections) == 2
        finally:
            pool.close()


async def test_a_scrape_pipelined_behind_a_request_counts_it(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    # The access record is made once the answer is written; the count is not: a
    # scrape the client sent in the same segment already sees the request before it.
    config = base_config(fake_model.url)
    config["admin"] = {"enabled": False}  # /metrics on the main listener
    config["routes"] = [
        {"name": "infer", "path_prefix": "/infer", "methods": ["POST"], "upstream": "model"}
    ]
    sidecar = await start_sidecar(config)
    out = await raw_request(
        sidecar.running.main_port,
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 404 ")
    assert b'route="-",status="404"' in out


async def test_parser_refusals_are_counted_and_logged(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sink = ListSink()
    sidecar = await start_sidecar(base_config(fake_model.url), log_sinks={"access": sink})
    raw = await raw_request(
        sidecar.running.main_port,
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    (record,) = await flushed(sidecar, sink, 1)
    assert (record["status"], record["outcome"], record["route"]) == (400, "rejected", "-")
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert 'sidecar_requests_total{outcome="rejected",route="-",status="400"} 1.0' in text


async def test_the_pool_caps_connections_and_reuses_the_warmest(fake_model: FakeModel) -> None:
    port = int(fake_model.url.rsplit(":", 1)[1])
    pool = Pool(LOOPBACK, port, max_connections=2)

    async def one() -> bytes:
        response = await pool.request("GET", "/x", [], None, replayable=True)
        body = await response.read()
        response.release()
        return body

    bodies = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), 10)
    assert len(bodies) == 20
    assert pool.open <= 2
    assert pool.idle_count == pool.open
    pool.close()


async def test_a_waiter_that_times_out_gives_no_one_a_turn_out_of_order(
    fake_model: FakeModel,
) -> None:
    """Waiters for a full pool are served in the order they came; one whose deadline
    passes leaves the queue without waking (and so re-queueing) the next."""
    port = int(fake_model.url.rsplit(":", 1)[1])
    pool = Pool(LOOPBACK, port, max_connections=1)
    busy = await pool.request("GET", "/x", [], None, replayable=True)
    order: list[str] = []

    async def wait(name: str, within: float) -> None:
        try:
            response = await pool.request(
                "GET", "/x", [], None, replayable=True, deadline=pool.loop.time() + within
            )
        except TimeoutError:
            order.append(f"{name} timed out")
            return
        order.append(name)
        await response.read()
        response.release()

    short = asyncio.create_task(wait("short", 0.05))
    await asyncio.sleep(0)
    first = asyncio.create_task(wait("first", 10))
    await asyncio.sleep(0)
    second = asyncio.create_task(wait("second", 10))
    await asyncio.wait_for(short, 5)
    await busy.read()
    busy.release()
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert order == ["short timed out", "first", "second"]
    pool.close()


async def test_a_released_connection_goes_to_the_first_waiter_not_to_a_newcomer(
    fake_model: FakeModel,
) -> None:
    """Under load a request arriving later must not take the connection a waiting one
    was woken for: one that lost every such race waited into its deadline."""
    port = int(fake_model.url.rsplit(":", 1)[1])
    pool = Pool(LOOPBACK, port, max_connections=1)
    busy = await pool.request("GET", "/x", [], None, replayable=True)
    waiting = asyncio.create_task(pool.request("GET", "/x", [], None, replayable=True))
    await asyncio.sleep(0)  # it is in line
    await busy.read()
    busy.release()
    # What a request arriving now (before the waiter runs) would find: nothing idle.
    assert pool.idle_count == 0
    assert pool._warm_idle() is None
    response = await asyncio.wait_for(waiting, 5)
    await response.read()
    response.release()
    assert pool.idle_count == 1  # nobody waits: back to the idle ones
    pool.close()


async def test_a_close_delimited_answer_is_relayed_whole(start_sidecar: StartSidecar) -> None:
    """An answer with neither Content-Length nor chunking ends where the upstream
    closes: relayed whole, and that connection is not reused."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader, writer)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for part in (b"first part, ", b"second part, ", b"the end"):
            writer.write(part)
            await writer.drain()
        # returning closes the connection: the end of the answer

    async with raw_upstream(script) as (url, connections):
        sidecar = await start_sidecar(upstream_config(url), wait_ready=False)
        for _ in range(2):
            async with sidecar.session.get(sidecar.url + "/x") as resp:
                assert resp.status == 200
                assert await resp.read() == b"first part, second part, the end"
        assert len(connections) >= 2  # a close-delimited answer's connection is spent


async def test_host_fields_fragments_and_empty_bodies(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    port = sidecar.running.main_port
    # RFC 9112 3.2: HTTP/1.1 needs a Host field; HTTP/1.0 may go without.
    no_host = await raw_request(port, b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert no_host.startswith(b"HTTP/1.1 400 ")
    assert b"Host field" in no_host
    old = await raw_request(port, b"GET /x HTTP/1.0\r\n\r\n")
    assert old.startswith(b"HTTP/1.0 200 ")
    # A fragment is the client's own business, never part of a request target.
    fragment = await raw_request(
        port, b"GET /x#secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert fragment.startswith(b"HTTP/1.1 400 ")
    # An empty POST keeps its Content-Length: 0 (servers may answer 411 without one).
    async with sidecar.session.post(
        sidecar.url + "/empty-post", data=b"", headers={"Content-Length": "0"}
    ) as resp:
        assert resp.status == 200
    (hit,) = fake_model.hits_for("/empty-post")
    assert hit.headers["content-length"] == ["0"]
    assert [h.path for h in fake_model.hits].count("/x") == 1  # only the HTTP/1.0 one
