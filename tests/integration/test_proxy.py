"""Forwarding, streaming, header handling and error mapping, over real sockets."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import re
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from yarl import URL

from tests.conftest import (
    LOOPBACK,
    FakeModel,
    StartSidecar,
    base_config,
    closed_port,
    raw_request,
    start_sidecar_process,
)

TRACEPARENT_RE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


async def test_get_with_query_string_is_forwarded_exactly(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    target = URL(sidecar.url + "/v1/models/m:predict?a=1&b=%2Fx&a=2", encoded=True)
    async with sidecar.session.get(target, headers={"X-Custom": "yes"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["path"] == "/v1/models/m:predict?a=1&b=%2Fx&a=2"
        assert resp.headers["X-Model"] == "fake"
    hit = fake_model.hits_for("/v1/models/m:predict")[0]
    assert hit.method == "GET"
    assert hit.target == "/v1/models/m:predict?a=1&b=%2Fx&a=2"
    assert hit.headers["x-custom"] == ["yes"]
    assert hit.body == b""


async def test_binary_post_body_arrives_intact(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    body = bytes(range(256)) * 40 + b"\xff\xfe\x00"
    async with sidecar.session.post(
        sidecar.url + "/infer", data=body, headers={"Content-Type": "application/octet-stream"}
    ) as resp:
        assert resp.status == 200
    hit = fake_model.hits_for("/infer")[0]
    assert hit.body == body
    assert hit.headers["content-type"] == ["application/octet-stream"]


async def test_ten_megabyte_body_forwarded_intact(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    config = base_config(fake_model.url, server={"max_body_size": "16MiB"})
    sidecar = await start_sidecar(config)
    body = os.urandom(10 * 1024 * 1024)

    async def digest(request: web.Request) -> web.Response:
        data = await request.read()
        return web.json_response({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})

    fake_model.on("/big", digest)
    async with sidecar.session.put(sidecar.url + "/big", data=io.BytesIO(body)) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer == {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}


async def test_large_response_streams_back_intact(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    payload = os.urandom(3 * 1024 * 1024)

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/octet-stream")

    fake_model.on("/big-answer", big)
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.get(sidecar.url + "/big-answer") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(payload))
        assert await resp.read() == payload


async def test_declared_oversized_body_is_refused_before_it_is_sent(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    # Only the head is sent: an answer proves the sidecar did not wait for the body.
    head = (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nX-Request-ID: big-1\r\n"
        b"Content-Length: 50000000\r\nContent-Type: application/json\r\n\r\n"
    )
    answer = await raw_request(sidecar.running.main_port, head)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"
    body = orjson.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "body_too_large"
    assert body["error"]["request_id"] == "big-1"
    assert fake_model.hits_for("/infer") == []


async def test_chunked_body_over_the_limit_is_refused(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url, server={"max_body_size": "1KiB"}))

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield b"x" * 512

    async with sidecar.session.post(sidecar.url + "/infer", data=chunks()) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["type"] == "body_too_large"
    assert fake_model.hits_for("/infer") == []


async def test_a_refused_body_closes_the_connection_even_when_it_was_read_whole(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A refusal of the HTTP layer (here 413) closes the connection after its answer,
    as RequestRefused promises, also when the client had sent the whole body and
    asked to keep the connection."""
    sidecar = await start_sidecar(base_config(fake_model.url, server={"max_body_size": "10B"}))
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(
            b"POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"b\r\n" + b"a" * 11 + b"\r\n0\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"\r\nConnection: close\r\n" in head
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await asyncio.wait_for(reader.readexactly(length), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and it closes
    finally:
        writer.close()
    assert fake_model.hits_for("/infer") == []


async def test_route_body_limit_overrides_the_server_default(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    config = base_config(fake_model.url)
    config["routes"] = [
        {"name": "small", "path_prefix": "/small", "upstream": "model", "max_body_size": "10B"},
        {"name": "all", "path_prefix": "/", "upstream": "model"},
    ]
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/small", data=b"x" * 11) as resp:
        assert resp.status == 413
    async with sidecar.session.post(sidecar.url + "/other", data=b"x" * 11) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_of_exactly_the_limit_is_forwarded_and_one_byte_more_refused(
    fake_model: FakeModel, start_sidecar: StartSidecar, framing: str
) -> None:
    """max_body_size is the largest body taken, declared or chunked; the byte past it
    is refused at once, even while the client has more to send. The body follows a
    100 Continue: read in parts, not as one that came with its head."""
    config = base_config(fake_model.url)
    config["server"]["max_body_size"] = "10B"
    sidecar = await start_sidecar(config)

    async def post(body: bytes, *, ended: bool = True) -> bytes:
        head = b"POST /limit HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
        if framing == "content-length":
            head += b"Content-Length: %d\r\n\r\n" % len(body)
        else:
            head += b"Transfer-Encoding: chunked\r\n\r\n"
            body = b"%x\r\n%s\r\n" % (len(body), body) + (b"0\r\n\r\n" if ended else b"")
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
        try:
            writer.write(head)
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if first != b"HTTP/1.1 100 Continue\r\n\r\n":
                return first + await asyncio.wait_for(reader.read(), 5)
            writer.write(body)
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    assert (await post(b"a" * 10)).startswith(b"HTTP/1.1 200 ")
    refused = await post(b"a" * 11)
    assert refused.startswith(b"HTTP/1.1 413 ")
    assert orjson.loads(refused.partition(b"\r\n\r\n")[2])["error"]["type"] == "body_too_large"
    if framing == "chunked":
        # 11 bytes and the body not ended: refused now, not after body_timeout.
        assert (await post(b"a" * 11, ended=False)).startswith(b"HTTP/1.1 413 ")
    assert [len(hit.body) for hit in fake_model.hits_for("/limit")] == [10]


@pytest.mark.parametrize(
    ("content_type", "parts"),
    [
        ("text/event-stream", (b"data: first\n\n", b"data: second\n\n")),
        ("application/json", (b'{"part": 1,', b' "done": true}')),  # chunked, still arriving
    ],
)
async def test_first_part_arrives_while_upstream_holds_the_stream(
    content_type: str,
    parts: tuple[bytes, bytes],
    fake_model: FakeModel,
    start_sidecar: StartSidecar,
) -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(parts[0])
        order.append("upstream sent first")
        await release.wait()
        order.append("upstream released")
        await response.write(parts[1])
        await response.write_eof()
        return response

    fake_model.on("/stream", stream)
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.post(sidecar.url + "/stream", data=b"{}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == content_type
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert "X-Request-ID" in resp.headers
        first = await asyncio.wait_for(resp.content.readexactly(len(parts[0])), 10)
        order.append("client got first")
        release.set()
        rest = await resp.read()
    assert (first, rest) == parts
    assert order == ["upstream sent first", "client got first", "upstream released"]


async def test_a_streamed_answer_to_an_http_1_0_client_ends_with_the_connection(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """HTTP/1.0 has no chunked coding: a streamed answer of unknown length goes to a
    1.0 client as it is, and ends where the connection does."""
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    fake_model.on("/stream", stream)
    sidecar = await start_sidecar(base_config(fake_model.url))
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # streaming begun
        release.set()
        body = await asyncio.wait_for(reader.read(), 5)
    finally:
        release.set()
        writer.close()
    assert head.startswith(b"HTTP/1.0 200 "), head
    assert b"transfer-encoding" not in head.lower()
    assert b"content-length" not in head.lower()
    assert body == b"data: first\n\ndata: second\n\n"


async def test_chunked_answer_that_arrived_whole_goes_out_with_a_length(
    start_sidecar: StartSidecar,
) -> None:
    # A model server that always chunks, writing its whole answer in one go (as
    # NGINX and many JSON servers do); a raw server makes that one write certain.
    answer = b'{"outputs":[1,2,3]}'
    reply = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(answer), answer)
    )

    async def model(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            writer.write(reply)

    server = await asyncio.start_server(model, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sidecar = await start_sidecar(base_config(f"http://{LOOPBACK}:{port}"))
        for _ in range(3):
            async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == str(len(answer))
                assert "Transfer-Encoding" not in resp.headers
                assert await resp.read() == answer
    finally:
        server.close()


async def test_hop_by_hop_headers_are_dropped_both_ways(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={
                "Connection": "keep-alive, X-Up-Private",
                "X-Up-Private": "1",
                "Keep-Alive": "timeout=5",
                "X-Up-Public": "1",
            },
        )

    fake_model.on("/hop", answer)
    sidecar = await start_sidecar(base_config(fake_model.url))
    headers = {
        "Connection": "keep-alive, X-Client-Private",
        "X-Client-Private": "secret-ish",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "X-Client-Public": "1",
    }
    async with sidecar.session.get(sidecar.url + "/hop", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Up-Public"] == "1"
        assert "X-Up-Private" not in resp.headers
        assert "Keep-Alive" not in resp.headers
    hit = fake_model.hits_for("/hop")[0]
    for name in ("x-client-private", "keep-alive", "te", "proxy-authorization"):
        assert name not in hit.headers, name
    assert hit.headers["x-client-public"] == ["1"]
    assert hit.headers["x-forwarded-for"] == [LOOPBACK]
    assert hit.headers["x-forwarded-proto"] == ["http"]
    assert hit.headers["x-forwarded-host"] == [f"{LOOPBACK}:{sidecar.running.main_port}"]


async def test_x_forwarded_for_is_appended(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.get(sidecar.url + "/x", headers={"X-Forwarded-For": "10.1.2.3"}):
        pass
    assert fake_model.hits_for("/x")[0].headers["x-forwarded-for"] == [f"10.1.2.3, {LOOPBACK}"]


async def test_request_id_kept_replaced_and_echoed(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.get(
        sidecar.url + "/a", headers={"X-Request-ID": "req.1:A-b_c"}
    ) as r:
        assert r.headers["X-Request-ID"] == "req.1:A-b_c"
    assert fake_model.hits_for("/a")[0].headers["x-request-id"] == ["req.1:A-b_c"]

    for unsafe in ("has space", "x" * 129, "semi;colon", "<script>"):
        async with sidecar.session.get(sidecar.url + "/b", headers={"X-Request-ID": unsafe}) as r:
            made = r.headers["X-Request-ID"]
            assert made != unsafe
            assert re.fullmatch(r"[0-9a-f]{32}", made)
        assert fake_model.hits_for("/b")[-1].headers["x-request-id"] == [made]

    async with sidecar.session.get(sidecar.url + "/c") as r:
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])


async def test_traceparent_made_when_absent_and_kept_when_valid(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.get(sidecar.url + "/t1"):
        pass
    made = fake_model.hits_for("/t1")[0].headers["traceparent"]
    assert len(made) == 1
    assert TRACEPARENT_RE.fullmatch(made[0])

    valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with sidecar.session.get(sidecar.url + "/t2", headers={"traceparent": valid}):
        pass
    assert fake_model.hits_for("/t2")[0].headers["traceparent"] == [valid]

    for invalid in (
        "garbage",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ):
        async with sidecar.session.get(sidecar.url + "/t3", headers={"traceparent": invalid}):
            pass
        sent = fake_model.hits_for("/t3")[-1].headers["traceparent"][0]
        assert sent != invalid
        assert TRACEPARENT_RE.fullmatch(sent)


async def test_server_timing_names_upstream_and_total(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.get(sidecar.url + "/timed") as resp:
        timing = resp.headers["Server-Timing"]
    match = re.fullmatch(r"upstream;dur=([\d.]+), total;dur=([\d.]+)", timing)
    assert match is not None, timing
    assert float(match.group(1)) <= float(match.group(2))


async def test_connection_refused_is_502_upstream_error(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(base_config(f"http://{LOOPBACK}:{closed_port()}"))
    async with sidecar.session.post(
        sidecar.url + "/infer", data=b"{}", headers={"X-Request-ID": "refused-1"}
    ) as resp:
        assert resp.status == 502
        assert resp.headers["X-Request-ID"] == "refused-1"
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["type"] == "upstream_error"
    assert error["request_id"] == "refused-1"
    assert "Traceback" not in error["message"]


async def test_upstream_timeout_is_504(fake_model: FakeModel, start_sidecar: StartSidecar) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    fake_model.on("/hang", hang)
    config = base_config(fake_model.url)
    config["routes"][0]["timeout"] = "200ms"
    sidecar = await start_sidecar(config)
    async with sidecar.session.get(sidecar.url + "/hang") as resp:
        assert resp.status == 504
        body = await resp.json()
    assert body["error"]["type"] == "upstream_timeout"
    assert body["error"]["request_id"] == resp.headers["X-Request-ID"]
    never.set()


async def test_model_errors_pass_through_untouched(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    async def bad_input(request: web.Request) -> web.Response:
        return web.Response(status=400, text="model says: bad tensor", content_type="text/plain")

    async def crashed(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": "CUDA out of memory"}, status=500, headers={"X-Model-Error": "oom"}
        )

    fake_model.on("/bad", bad_input)
    fake_model.on("/crash", crashed)
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.post(sidecar.url + "/bad", data=b"{}") as resp:
        assert resp.status == 400
        assert await resp.text() == "model says: bad tensor"
        assert resp.content_type == "text/plain"
    async with sidecar.session.post(sidecar.url + "/crash", data=b"{}") as resp:
        assert resp.status == 500
        assert await resp.json() == {"error": "CUDA out of memory"}
        assert resp.headers["X-Model-Error"] == "oom"


async def test_compressed_answer_passes_through_byte_for_byte(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    compressed = gzip.compress(b'{"outputs": []}' * 100)

    async def gz(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    fake_model.on("/gz", gz)
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.get(sidecar.url + "/gz", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert await r.read() == compressed
    # A client that did not ask for compression is not made to ask by the sidecar.
    async with sidecar.session.get(sidecar.url + "/plain", skip_auto_headers=["Accept-Encoding"]):
        pass
    assert "accept-encoding" not in fake_model.hits_for("/plain")[0].headers


async def test_one_clients_cookies_never_reach_another(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    async def set_cookie(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.set_cookie("session", "alice-secret")
        return response

    fake_model.on("/login", set_cookie)
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.get(sidecar.url + "/login") as resp:
        assert "session=alice-secret" in resp.headers["Set-Cookie"]
    async with aiohttp.ClientSession() as bob, bob.get(sidecar.url + "/after"):
        pass
    assert "cookie" not in fake_model.hits_for("/after")[0].headers


async def test_absolute_form_target_is_refused(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    request = (
        b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    answer = await raw_request(sidecar.running.main_port, request)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"type":"bad_request"' in answer
    assert fake_model.hits == []


async def test_a_405_lists_the_methods_allowed(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """RFC 9110 section 15.5.6: a 405 MUST carry Allow. The admin listener's had it;
    the main listener's, for a route's method or an own endpoint, did not."""
    config = base_config(fake_model.url)
    config["admin"]["enabled"] = False  # the own endpoints on the main listener
    config["routes"] = [
        {"name": "infer", "path_prefix": "/infer", "methods": ["POST"], "upstream": "model"},
        {"name": "meta", "path_prefix": "/infer", "methods": ["GET"], "upstream": "model"},
    ]
    sidecar = await start_sidecar(config)
    port = sidecar.running.main_port
    for target, allowed in ((b"/infer/x", b"GET, POST"), (b"/livez", b"GET, HEAD")):
        raw = await raw_request(
            port, b"DELETE %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405 "), head
        assert b"\r\nAllow: %s\r\n" % allowed in head + b"\r\n", head
        assert orjson.loads(body)["error"]["type"] == "method_not_allowed"


async def test_a_refused_trace_or_connect_lists_the_methods_allowed(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """TRACE and CONNECT are refused on every path with a 405, which carried no Allow
    (RFC 9110 section 15.5.6: a 405 MUST). It lists what the path's routes take (a
    route that names no methods takes any a route may name) or its own endpoint's. A
    target nothing serves gets what any other method gets there: 404, or 400 for one
    that is not a plain path."""
    config = base_config(fake_model.url)
    config["admin"]["enabled"] = False  # the own endpoints on the main listener
    config["routes"] = [
        {"name": "infer", "path_prefix": "/infer", "methods": ["POST"], "upstream": "model"},
        {"name": "meta", "path_prefix": "/infer", "methods": ["GET"], "upstream": "model"},
        {"name": "v2", "path_prefix": "/v2/", "upstream": "model"},
    ]
    sidecar = await start_sidecar(config)
    port = sidecar.running.main_port
    any_method = b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
    for method in (b"TRACE", b"CONNECT"):
        for target, allowed in (
            (b"/infer/x", b"GET, POST"),
            (b"/livez", b"GET, HEAD"),
            (b"/v2/models/iris/infer", any_method),
        ):
            raw = await raw_request(
                port, b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (method, target)
            )
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 405 "), (method, head)
            assert b"\r\nAllow: %s\r\n" % allowed in head + b"\r\n", (method, head)
            assert orjson.loads(body)["error"]["type"] == "method_not_allowed"
        # Nothing serves these targets: the answer any method gets there (a target
        # that is not a plain path is refused before any route is looked for).
        for target, expected in (
            (b"/nothing", (b"404", "no_route")),
            (b"http://evil.example/x", (b"400", "bad_request")),
        ):
            answers = []
            for request_method in (method, b"GET"):
                raw = await raw_request(
                    port,
                    b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    % (request_method, target),
                )
                head, _, body = raw.partition(b"\r\n\r\n")
                assert b"\r\nallow:" not in head.lower(), (request_method, head)
                answers.append((head.split(b" ")[1], orjson.loads(body)["error"]["type"]))
            assert answers == [expected] * 2, (method, target)
    assert fake_model.hits == []


async def test_a_refused_request_is_answered_in_its_routes_shape(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Refused before the route was matched (TRACE, a transfer coding other than
    chunked, two Host fields) or by the HTTP layer before the pipeline (a header
    field over the limit, broken chunked framing), they came in the plain shape on a
    V2 or OpenAI route too, where V2 clients read a string error and OpenAI clients
    an error object. The request line names the route's path."""
    config = base_config(fake_model.url)
    config["routes"] = [
        {"name": "v2", "path_prefix": "/v2/", "protocol": "v2", "upstream": "model"},
        {"name": "chat", "path_prefix": "/v1/", "protocol": "openai", "upstream": "model"},
    ]
    sidecar = await start_sidecar(config)
    port = sidecar.running.main_port
    big = b"X-Big: " + b"a" * 20_000 + b"\r\n"
    refusals = {
        "TRACE": (b"TRACE %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"405"),
        "coding": (
            b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
            b"Connection: close\r\n\r\n0\r\n\r\n",
            b"400",
        ),
        "hosts": (b"GET %s HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n", b"400"),
        "big field": (b"GET %s HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n", b"431"),
        "framing": (
            b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"400",
        ),
    }
    for name, (request, status) in refusals.items():
        for target, protocol in ((b"/v2/models/iris/infer", "v2"), (b"/v1/chat", "openai")):
            raw = await raw_request(port, request % target)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == status, (name, head)
            error = orjson.loads(body)
            if protocol == "v2":
                assert isinstance(error["error"], str), (name, error)
                assert error["request_id"], (name, error)
            else:
                assert error["error"]["code"] == error["error"]["type"], (name, error)
    # The HTTP layer answers an HTTP/1.0 client's refusal as HTTP/1.0.
    raw = await raw_request(port, b"GET /v2/x HTTP/1.0\r\n" + big + b"\r\n")
    assert raw.startswith(b"HTTP/1.0 431 "), raw[:100]
    # A path no route takes, with routes of two protocols: the plain shape.
    raw = await raw_request(port, b"GET /v3/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    error = orjson.loads(raw.partition(b"\r\n\r\n")[2])["error"]
    assert (error["type"], "code" in error) == ("no_route", False), error
    assert fake_model.hits == []


async def test_a_request_no_route_takes_is_answered_in_the_protocol_every_route_speaks(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A mistyped path on a sidecar whose routes all speak OpenAI: its clients are
    openai clients, which read an error object (its type and code; the plain shape
    left code None); by the pipeline (404) and by the HTTP layer (431) alike."""
    config = base_config(fake_model.url)
    config["routes"] = [
        {"name": "chat", "path_prefix": "/v1/chat/", "protocol": "openai", "upstream": "model"},
        {"name": "models", "path_prefix": "/v1/models", "protocol": "openai", "upstream": "model"},
    ]
    sidecar = await start_sidecar(config)
    big = b"X-Big: " + b"a" * 20_000 + b"\r\n"
    for request, status in (
        (b"POST /v1/chat-completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"404"),
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n", b"431"),
    ):
        raw = await raw_request(sidecar.running.main_port, request)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == status, head
        error = orjson.loads(body)["error"]
        assert error["code"] == error["type"], error
        assert (
            error["request_id"]
            == dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])["X-Request-ID"]
        )
    assert fake_model.hits == []


async def test_unknown_route_and_method(fake_model: FakeModel, start_sidecar: StartSidecar) -> None:
    config = base_config(fake_model.url)
    config["routes"] = [
        {
            "name": "infer",
            "path_prefix": "/v2/models/iris/infer",
            "methods": ["POST"],
            "upstream": "model",
        },
    ]
    sidecar = await start_sidecar(config)
    async with sidecar.session.get(sidecar.url + "/v2/models/iris/infer") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["type"] == "method_not_allowed"
    async with sidecar.session.post(sidecar.url + "/v2/models/iris/inferX") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "no_route"
    async with sidecar.session.post(sidecar.url + "/v2/models/iris/infer/", data=b"{}") as resp:
        assert resp.status == 200
    assert len(fake_model.hits) == 1


async def test_stream_broken_by_the_model_is_cut_short_and_logged(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: partial\n\n")
        assert request.transport is not None
        request.transport.close()  # the model dies mid-answer
        return response

    fake_model.on("/broken", broken)
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(base_config(fake_model.url)))
    process, port, _ = await start_sidecar_process(config_path)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://{LOOPBACK}:{port}/broken", headers={"X-Request-ID": "cut-1"}
            ) as resp,
        ):
            assert resp.status == 200
            assert await resp.content.readuntil(b"\n\n") == b"data: partial\n\n"
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        assert process.stdout is not None
        while True:  # every log line is JSON; the one about this request names it
            record = orjson.loads(await asyncio.wait_for(process.stdout.readline(), 30))
            if record["event"] == "upstream_aborted_stream":
                break
        assert record["request_id"] == "cut-1"
        assert record["upstream"] == "model"
        assert re.fullmatch(r"[0-9a-f]{32}", record["trace_id"])
    finally:
        process.terminate()
        await process.wait()
