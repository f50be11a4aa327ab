"""Deadlines, retries, the retry budget, the breaker, fallbacks and load shedding.

Every test scripts the fake model and asserts on counts and order, not on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.config.schema import BreakerSettings
from sidecar.http import errors
from sidecar.pipeline.auth import hash_key
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.breaker import CLOSED, OPEN, BreakerFailure, UpstreamBreaker
from tests.conftest import (
    LOOPBACK,
    FakeClock,
    FakeModel,
    MakeFakeModel,
    SidecarHandle,
    StartSidecar,
    base_config,
    clients_that_sent,
    closed_port,
    raw_request,
)
from tests.integration.test_endpoints import metric_value


def route(**settings: Any) -> dict[str, Any]:
    return {"name": "infer", "path_prefix": "/", "upstream": "model", **settings}


def config_with(
    upstream_url: str, route_settings: dict[str, Any], **upstream: Any
) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["routes"] = [route(**route_settings)]
    config["upstreams"]["model"].update(upstream)
    return config


async def metrics_text(sidecar: SidecarHandle) -> str:
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        return await resp.text()


def hanging_until(release: asyncio.Event) -> Any:
    """A model that does not answer until ``release`` is set."""

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    return hang


def status_handler(status: int, headers: dict[str, str] | None = None) -> Any:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"status": status}, status=status, headers=headers)

    return answer


STATIC = {"static": {"name": "default-answer", "status": 200, "body": {"label": -1}}}


def cache_then_static(upstream_url: str, **route_settings: Any) -> dict[str, Any]:
    """A route whose fallback is the cache (1 h), then the static answer; the model's
    breaker off, so that every request reaches the model."""
    chain = [{"cache": {"ttl": "1h"}}, STATIC]
    return config_with(
        upstream_url, {**route_settings, "fallback": {"chain": chain}}, breaker={"enabled": False}
    )


def stalling_answer(
    never: asyncio.Event, *, status: int = 200, started: asyncio.Event | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler that sends a head and the start of a 100-byte body, then goes silent
    until ``never`` is set (``started``, when given, is set once it has)."""

    async def stalling(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status)
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"outputs": ')
        if started is not None:
            started.set()
        await never.wait()
        return response

    return stalling


async def test_refused_connections_are_retried_then_fall_back(
    start_sidecar: StartSidecar,
) -> None:
    config = config_with(
        f"http://{LOOPBACK}:{closed_port()}",
        {
            "retryable": True,
            "retry": {"attempts": 3, "backoff_base": "1ms"},
            "fallback": {"chain": [STATIC]},
        },
        breaker={"enabled": False},
    )
    sidecar = await start_sidecar(config, wait_ready=False)
    async with sidecar.session.post(sidecar.url + "/infer", json={"x": 1}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
        assert await resp.json() == {"label": -1}
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_retries_total", upstream="model", reason="connect") == 2
    assert metric_value(text, "sidecar_fallback_total", route="infer", rule="default-answer") == 1
    assert metric_value(text, "sidecar_requests_total", route="infer", outcome="fallback") == 1


async def test_hang_gives_504_after_exactly_the_configured_attempts(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    never = asyncio.Event()
    fake_model.on("/infer", hanging_until(never))
    config = config_with(
        fake_model.url,
        {
            "retryable": True,
            "timeout": "10s",
            "per_try_timeout": "100ms",
            "retry": {"attempts": 3, "backoff_base": "1ms"},
        },
    )
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["type"] == "upstream_timeout"
    assert len(fake_model.hits_for("/infer")) == 3
    # Each attempt told the model how long it had.
    assert all(
        int(h.headers["x-sidecar-timeout-ms"][0]) <= 100 for h in fake_model.hits_for("/infer")
    )
    never.set()


async def test_the_total_deadline_bounds_the_retries(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    never = asyncio.Event()
    fake_model.on("/infer", hanging_until(never))
    config = config_with(
        fake_model.url,
        {
            "retryable": True,
            "timeout": "300ms",
            "per_try_timeout": "200ms",
            "retry": {"attempts": 5, "backoff_base": "1ms"},
        },
    )
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 504
        assert "deadline" in (await resp.json())["error"]["message"]
    # 300 ms holds one 200 ms try and what is left of a second, never the five allowed
    # (a busy machine may leave room for only the first).
    assert 1 <= len(fake_model.hits_for("/infer")) <= 2
    never.set()


async def test_non_retryable_routes_are_tried_once(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    fake_model.on("/infer", status_handler(503))
    config = config_with(fake_model.url, {"retry": {"attempts": 3}})
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 503
        assert await resp.json() == {"status": 503}  # the model's own answer
    assert len(fake_model.hits_for("/infer")) == 1


async def test_only_configured_statuses_are_retried(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    fake_model.on("/e500", status_handler(500))
    fake_model.on("/e503", status_handler(503))
    config = config_with(
        fake_model.url,
        {"retryable": True, "retry": {"attempts": 3, "backoff_base": "1ms"}},
        breaker={"enabled": False},
    )
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/e500", data=b"{}") as resp:
        assert resp.status == 500
    async with sidecar.session.post(sidecar.url + "/e503", data=b"{}") as resp:
        assert resp.status == 503
    assert len(fake_model.hits_for("/e500")) == 1
    assert len(fake_model.hits_for("/e503")) == 3


async def test_retry_after_is_honoured(fake_model: FakeModel, start_sidecar: StartSidecar) -> None:
    arrivals: list[float] = []

    async def busy_once(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            return web.json_response({}, status=503, headers={"Retry-After": "1"})
        return web.json_response({"ok": True})

    fake_model.on("/infer", busy_once)
    config = config_with(
        fake_model.url, {"retryable": True, "timeout": "5s", "retry": {"backoff_base": "1ms"}}
    )
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 200
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 1.0  # a lower bound: the wait it was asked for


async def test_a_retry_after_of_odd_digits_is_ignored_not_a_crash(
    start_sidecar: StartSidecar,
) -> None:
    # "²" (0xB2 in latin-1) is a digit to str.isdigit() but not to float().
    from sidecar.upstream.retry import parse_retry_after
    from tests.integration.test_http_layer import answer, raw_upstream

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if b" /v2/health/" in head.split(b"\r\n", 1)[0]:
                writer.write(answer(b"ready"))
            else:
                await reader.readexactly(2)  # the body, b"{}"
                writer.write(answer(b"busy", status=b"503 Busy", extra=b"Retry-After: \xb2\r\n"))
            await writer.drain()

    async with raw_upstream(script) as (url, _):
        for retryable in (False, True):
            config = config_with(url, {"retryable": retryable, "retry": {"attempts": 2}})
            sidecar = await start_sidecar(config)
            async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
                assert resp.status == 503, retryable  # the model's own answer, passed on
                assert await resp.read() == b"busy"
    assert parse_retry_after("\u00b2") is None


async def test_retry_after_beyond_the_deadline_is_not_waited_for(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    fake_model.on("/infer", status_handler(503, {"Retry-After": "30"}))
    config = config_with(fake_model.url, {"retryable": True, "timeout": "2s"})
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "30"
    assert len(fake_model.hits_for("/infer")) == 1


async def test_retry_budget_caps_attempts_in_a_full_outage(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    clients = 100
    everyone_in = asyncio.Event()

    async def failing(request: web.Request) -> web.Response:
        # Hold the first attempts until every client's request is in flight, so the
        # outage meets 100 concurrent requests, then fail them all.
        if len(fake_model.hits_for("/infer")) >= clients:
            everyone_in.set()
        await everyone_in.wait()
        return web.json_response({"error": "down"}, status=503)

    fake_model.on("/infer", failing)
    config = config_with(
        fake_model.url,
        {"retryable": True, "timeout": "20s", "retry": {"attempts": 2, "backoff_base": "10ms"}},
        breaker={"enabled": False},
        max_connections=200,
    )
    sidecar = await start_sidecar(config)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.post(sidecar.url + "/infer", data=b"{}") as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(clients))), 60)
    assert statuses == [503] * clients
    attempts = len(fake_model.hits_for("/infer"))
    assert clients < attempts <= 1.2 * clients, attempts
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_retry_budget_exhausted_total", upstream="model") == (
        2 * clients - attempts
    )


async def test_breaker_opens_stops_calling_probes_once_and_closes(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    gate = asyncio.Event()
    probe_arrived = asyncio.Event()
    healthy = False

    async def storm_then_recover(request: web.Request) -> web.Response:
        if not healthy:
            return web.json_response({"error": "overloaded GPU"}, status=503)
        probe_arrived.set()
        await gate.wait()
        return web.json_response({"ok": True})

    fake_model.on("/infer", storm_then_recover)
    config = config_with(
        fake_model.url,
        {},
        breaker={"failures": 3, "reset_timeout": "10s", "half_open_probes": 1},
    )
    clock = FakeClock()
    sidecar = await start_sidecar(config, clock=clock)
    url = sidecar.url + "/infer"
    for _ in range(3):
        async with sidecar.session.post(url, data=b"{}") as resp:
            assert resp.status == 503  # the model's answer passes through
    for _ in range(5):
        async with sidecar.session.post(url, data=b"{}") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["type"] == "circuit_open"
    assert len(fake_model.hits_for("/infer")) == 3  # open: the model was not called

    healthy = True
    clock.advance(9.9)
    async with sidecar.session.post(url, data=b"{}") as resp:
        assert resp.status == 503  # not yet: the reset timeout has not passed
    clock.advance(0.2)
    probe = asyncio.create_task(sidecar.session.post(url, data=b"{}"))
    await asyncio.wait_for(probe_arrived.wait(), 10)
    for _ in range(5):  # while the single probe is out, everyone else is refused
        async with sidecar.session.post(url, data=b"{}") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["type"] == "circuit_open"
    assert len(fake_model.hits_for("/infer")) == 4
    gate.set()
    async with await probe as resp:
        assert resp.status == 200
    for _ in range(3):
        async with sidecar.session.post(url, data=b"{}") as resp:
            assert resp.status == 200
    assert len(fake_model.hits_for("/infer")) == 7

    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_circuit_state", upstream="model") == 0
    for old, new in (("closed", "open"), ("open", "half-open"), ("half-open", "closed")):
        assert (
            metric_value(
                text,
                "sidecar_circuit_transitions_total",
                upstream="model",
                from_state=old,
                to_state=new,
            )
            == 1
        )


async def test_failed_probe_reopens_the_circuit(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    fake_model.on("/infer", status_handler(502))
    config = config_with(fake_model.url, {}, breaker={"failures": 1, "reset_timeout": "5s"})
    clock = FakeClock()
    sidecar = await start_sidecar(config, clock=clock)
    url = sidecar.url + "/infer"
    async with sidecar.session.post(url, data=b"{}") as resp:
        assert resp.status == 502
    clock.advance(5.1)
    async with sidecar.session.post(url, data=b"{}") as resp:
        assert resp.status == 502  # the probe reached the model and failed
    async with sidecar.session.post(url, data=b"{}") as resp:
        assert (await resp.json())["error"]["type"] == "circuit_open"
    assert len(fake_model.hits_for("/infer")) == 2
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_circuit_state", upstream="model") == 2
    assert (
        metric_value(
            text,
            "sidecar_circuit_transitions_total",
            upstream="model",
            from_state="half-open",
            to_state="open",
        )
        == 1
    )


async def test_model_4xx_answers_do_not_open_the_breaker(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    fake_model.on("/infer", status_handler(422))
    config = config_with(fake_model.url, {}, breaker={"failures": 2})
    sidecar = await start_sidecar(config)
    for _ in range(6):
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.status == 422
    assert len(fake_model.hits_for("/infer")) == 6


async def test_open_circuit_answers_from_the_fallback(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    fake_model.on("/infer", status_handler(503))
    config = config_with(
        fake_model.url,
        {"fallback": {"triggers": ["circuit_open"], "chain": [STATIC]}},
        breaker={"failures": 2, "reset_timeout": "1h"},
    )
    sidecar = await start_sidecar(config)
    for _ in range(2):  # upstream_error is not a trigger here: the model's 503 passes
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.status == 503
            assert "X-Sidecar-Fallback" not in resp.headers
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"


RULES = {
    "rules": [
        {
            "name": "wide-petals",
            "when": {"field": "inputs[0].data[3]", "gt": 1.7},
            "respond": {"body": {"label": 2}},
        },
        {
            "name": "tier-gold",
            "when": {
                "all": [
                    {"field": "parameters.tier", "in": ["gold"]},
                    {"field": "inputs", "exists": True},
                ]
            },
            "respond": {"status": 200, "body": {"label": 0}, "headers": {"X-Rule": "gold"}},
        },
    ]
}


async def test_rules_answer_by_the_request_fields_else_the_next_step(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    fake_model.on("/infer", status_handler(503))
    config = config_with(
        fake_model.url, {"fallback": {"chain": [RULES, STATIC]}}, breaker={"enabled": False}
    )
    sidecar = await start_sidecar(config)

    async def ask(payload: Any) -> tuple[str, Any, aiohttp.ClientResponse]:
        async with sidecar.session.post(sidecar.url + "/infer", json=payload) as resp:
            return resp.headers["X-Sidecar-Fallback"], await resp.json(), resp

    rule, body, _ = await ask({"inputs": [{"data": [6.9, 3.1, 5.4, 2.1]}]})
    assert (rule, body) == ("wide-petals", {"label": 2})
    rule, body, resp = await ask(
        {"inputs": [{"data": [5, 3, 1, 0.2]}], "parameters": {"tier": "gold"}}
    )
    assert (rule, body) == ("tier-gold", {"label": 0})
    assert resp.headers["X-Rule"] == "gold"
    rule, body, _ = await ask({"inputs": [{"data": [5, 3, 1, 0.2]}]})
    assert (rule, body) == ("default-answer", {"label": -1})


async def test_a_configured_answer_names_its_own_content_type_in_any_case(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A static answer whose headers give ``content-type`` (lower-case) went out with
    two Content-Type fields, the default application/json first: clients read the
    first and took a text answer for JSON."""
    fake_model.on("/infer", status_handler(503))
    static = {
        "static": {"name": "plain", "body": "down", "headers": {"content-type": "text/plain"}}
    }
    config = config_with(
        fake_model.url, {"fallback": {"chain": [static]}}, breaker={"enabled": False}
    )
    sidecar = await start_sidecar(config)
    raw = await raw_request(
        sidecar.running.main_port, b"GET /infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200 ")
    assert head.count(b"\r\ncontent-type:") == 1, head
    assert b"\r\ncontent-type: text/plain\r\n" in head


async def test_a_head_request_is_answered_from_the_cached_get(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """With the model down, a GET was answered from the cache but a HEAD of the same
    target by the next step: another status, other fields and another Content-Length
    than the GET's (RFC 9110 section 9.3.2: a HEAD's head is the GET's)."""
    state = {"up": True}

    async def flaky(request: web.Request) -> web.Response:
        if state["up"]:
            return web.json_response({"labels": [1, 2, 3]})
        return web.json_response({"error": "down"}, status=503)

    fake_model.on("/infer", flaky)
    config = cache_then_static(fake_model.url)
    sidecar = await start_sidecar(config)
    port = sidecar.running.main_port
    await raw_request(port, b"GET /infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    state["up"] = False
    raw = await raw_request(
        port,
        b"GET /infer HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    get, _, rest = raw.partition(b"\r\n\r\n")
    assert b"\r\nX-Sidecar-Fallback: cache\r\n" in get
    body = b'{"labels": [1, 2, 3]}'  # aiohttp's json.dumps
    assert rest.startswith(body)
    head = rest[len(body) :]
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert head.endswith(b"\r\n\r\n")  # a head only
    assert b"\r\nX-Sidecar-Fallback: cache\r\n" in head
    assert b"\r\nContent-Length: %d\r\n" % len(body) in head


async def test_cache_serves_the_earlier_good_answer_with_age(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    state = {"up": True}

    async def flaky(request: web.Request) -> web.Response:
        if state["up"]:
            payload = await request.json()
            return web.json_response({"echo": payload})
        return web.json_response({"error": "down"}, status=503)

    fake_model.on("/infer", flaky)
    config = cache_then_static(fake_model.url)
    clock = FakeClock()
    sidecar = await start_sidecar(config, clock=clock)
    async with sidecar.session.post(
        sidecar.url + "/infer",
        data=b'{"b": 2, "a": 1}',
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
        good = await resp.read()
    state["up"] = False
    clock.advance(42)
    # The same request written differently (key order, spaces) hits the cache.
    async with sidecar.session.post(sidecar.url + "/infer", data=b'{ "a": 1, "b": 2 }') as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Fallback"] == "cache"
        assert resp.headers["Age"] == "42"
        assert resp.content_type == "application/json"
        assert await resp.read() == good
    async with sidecar.session.post(sidecar.url + "/infer", data=b'{"a": 2}') as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
    clock.advance(3600)  # past the TTL the entry is gone
    async with sidecar.session.post(sidecar.url + "/infer", data=b'{"a": 1, "b": 2}') as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"


async def test_a_cached_answer_keeps_its_content_type_whole(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """The cache kept the answer's media type only: a Latin-1 text answer came back
    as ``text/plain``, its charset gone, and a client read its bytes as UTF-8."""
    state = {"up": True}
    content_type = "text/plain; charset=iso-8859-1"

    async def latin1(request: web.Request) -> web.Response:
        await request.read()
        if state["up"]:
            return web.Response(
                body="café".encode("latin-1"), headers={"Content-Type": content_type}
            )
        return web.json_response({"error": "down"}, status=503)

    fake_model.on("/infer", latin1)
    config = cache_then_static(fake_model.url)
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.headers["Content-Type"] == content_type
        assert await resp.text() == "café"
    state["up"] = False
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "cache"
        assert resp.headers["Content-Type"] == content_type
        assert await resp.text() == "café"


async def test_only_a_whole_200_is_cached_never_a_range_requests_part(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A Range request's 206 went into the cache under the same key as the whole
    answer (method, target, body), without its Content-Range: once the model was
    down, a plain request got four bytes of ten as a 206 that said nothing of which
    part it was. Only a 200 is kept; it stands in for any request with that key (a
    server may answer a Range request with the whole representation)."""
    whole = b"0123456789"
    state = {"up": True}

    async def document(request: web.Request) -> web.Response:
        if not state["up"]:
            return web.json_response({"error": "down"}, status=503)
        if "Range" in request.headers:
            return web.Response(
                status=206,
                body=whole[:4],
                headers={"Content-Range": "bytes 0-3/10", "Content-Type": "text/plain"},
            )
        return web.Response(body=whole, content_type="text/plain")

    fake_model.on("/doc", document)
    config = cache_then_static(fake_model.url)
    sidecar = await start_sidecar(config)
    ranged = {"Range": "bytes=0-3"}
    async with sidecar.session.get(sidecar.url + "/doc") as resp:
        assert (resp.status, await resp.read()) == (200, whole)
    async with sidecar.session.get(sidecar.url + "/doc", headers=ranged) as resp:
        assert (resp.status, resp.headers["Content-Range"]) == (206, "bytes 0-3/10")
        assert await resp.read() == whole[:4]
    state["up"] = False
    for headers in ({}, ranged):
        async with sidecar.session.get(sidecar.url + "/doc", headers=headers) as resp:
            assert resp.headers["X-Sidecar-Fallback"] == "cache"
            assert (resp.status, await resp.read()) == (200, whole)
            assert "Content-Range" not in resp.headers
    # A part alone is never kept: with no whole answer in, the next step answers.
    state["up"] = True
    async with sidecar.session.get(sidecar.url + "/doc?v=2", headers=ranged) as resp:
        assert resp.status == 206
    state["up"] = False
    async with sidecar.session.get(sidecar.url + "/doc?v=2") as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"


async def test_an_answer_the_model_marks_as_one_clients_is_never_cached(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """The cache key is method, target and body: an answer that depends on who asked
    (``Cache-Control: private``, ``no-store``, ``Vary`` on a request field) went in
    all the same, and once the model was down another client got the first one's
    answer. Such answers are not kept; ``Vary: Accept-Encoding`` on an unencoded
    answer (every client reads it) does not stop one."""
    state = {"up": True}
    marks = {
        "/private": {"Cache-Control": "max-age=60, Private"},
        "/no-store": {"Cache-Control": "no-store"},
        "/vary": {"Vary": "Accept-Encoding, Authorization"},
        "/shared": {"Vary": "accept-encoding", "Cache-Control": "max-age=60"},
    }

    async def personal(request: web.Request) -> web.Response:
        if not state["up"]:
            return web.json_response({"error": "down"}, status=503)
        headers = marks[request.path]
        return web.json_response({"for": request.headers.get("X-User")}, headers=headers)

    for path in marks:
        fake_model.on(path, personal)
    config = cache_then_static(fake_model.url)
    sidecar = await start_sidecar(config)
    for path in marks:
        async with sidecar.session.get(sidecar.url + path, headers={"X-User": "ann"}) as resp:
            assert await resp.json() == {"for": "ann"}
    state["up"] = False
    answered = {}
    for path in marks:
        async with sidecar.session.get(sidecar.url + path, headers={"X-User": "bob"}) as resp:
            answered[path] = resp.headers["X-Sidecar-Fallback"]
    assert answered == {
        "/private": "default-answer",
        "/no-store": "default-answer",
        "/vary": "default-answer",
        "/shared": "cache",
    }


async def test_an_answer_to_a_request_the_model_authorized_is_not_cached_for_anyone(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A model server that checks the client's own Authorization (the sidecar's auth
    off, the field passed on): its answer to one authorized client was cached under
    method, target and body alone, so once the model was down a client without any
    credential got it, where the model would have said 401. As in a shared HTTP
    cache (RFC 9111, section 3.5), such an answer is kept only when the model says it
    may be shared (``public``, ``s-maxage``, ``must-revalidate``). Where the sidecar's
    own auth takes the Authorization field, the model never sees it: cached."""
    state = {"up": True}

    async def guarded(request: web.Request) -> web.Response:
        if not state["up"]:
            return web.json_response({"error": "down"}, status=503)
        if request.headers.get("Authorization") != "Bearer ann-token":
            return web.json_response({"error": "who?"}, status=401)
        headers = {"Cache-Control": "public"} if request.path == "/public" else None
        return web.json_response({"label": 7}, headers=headers)

    for path in ("/infer", "/public"):
        fake_model.on(path, guarded)
    config = cache_then_static(fake_model.url)
    sidecar = await start_sidecar(config)
    ann = {"Authorization": "Bearer ann-token"}
    for path in ("/infer", "/public"):
        async with sidecar.session.post(sidecar.url + path, json={"x": 1}, headers=ann) as resp:
            assert (resp.status, await resp.json()) == (200, {"label": 7})
        async with sidecar.session.post(sidecar.url + path, json={"x": 1}) as resp:
            assert resp.status == 401  # the model's verdict on a client without one
    state["up"] = False
    answered = {}
    for path in ("/infer", "/public"):
        async with sidecar.session.post(sidecar.url + path, json={"x": 1}) as resp:
            answered[path] = resp.headers["X-Sidecar-Fallback"]
    assert answered == {"/infer": "default-answer", "/public": "cache"}

    # The sidecar's own credential in Authorization is not passed on: kept.
    state["up"] = True
    config["auth"] = {
        "enabled": True,
        "header": None,
        "api_keys": [{"name": "ann", "digest": hash_key("ann-token")}],
    }
    own_auth = await start_sidecar(config)
    fake_model.on("/infer", status_handler(200))
    async with own_auth.session.post(own_auth.url + "/infer", json={"x": 1}, headers=ann) as resp:
        assert resp.status == 200
        assert "authorization" not in {name.lower() for name in fake_model.hits[-1].headers}
    state["up"] = False
    fake_model.on("/infer", guarded)
    async with own_auth.session.post(own_auth.url + "/infer", json={"x": 1}, headers=ann) as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "cache"


async def test_a_deeply_nested_request_body_is_answered_where_the_fallback_caches(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    # orjson reads JSON nested up to 1024 levels but writes only up to 254: the cache
    # key of such a body cannot be the canonical JSON, and must not fail the request.
    state = {"up": True}

    async def flaky(request: web.Request) -> web.Response:
        await request.read()
        if state["up"]:
            return web.json_response({"label": 1})
        return web.json_response({"error": "down"}, status=503)

    fake_model.on("/infer", flaky)
    config = cache_then_static(fake_model.url)
    sidecar = await start_sidecar(config)
    deep = b"[" * 300 + b"]" * 300
    async with sidecar.session.post(sidecar.url + "/infer", data=deep) as resp:
        assert resp.status == 200  # the model's answer, not a 500
        assert await resp.json() == {"label": 1}
    state["up"] = False
    async with sidecar.session.post(sidecar.url + "/infer", data=deep) as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Fallback"] == "cache"
        assert await resp.json() == {"label": 1}


async def test_a_compressed_answer_is_never_served_from_the_cache_without_its_encoding(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    # The cache keeps a body and its Content-Type: a gzip-encoded answer served from
    # it would reach a client as bytes it cannot read (and to clients that never
    # asked for gzip). Such answers are not cached.
    import gzip

    state = {"up": True}

    async def compressing(request: web.Request) -> web.Response:
        await request.read()
        if not state["up"]:
            return web.json_response({"error": "down"}, status=503)
        return web.Response(
            body=gzip.compress(b'{"label": 1}'),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    fake_model.on("/infer", compressing)
    config = cache_then_static(fake_model.url)
    sidecar = await start_sidecar(config)
    headers = {"Accept-Encoding": "gzip"}
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}", headers=headers) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"  # passed through as it came
        assert gzip.decompress(await resp.read()) == b'{"label": 1}'
    state["up"] = False
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}", headers=headers) as resp:
        assert resp.status == 200
        if resp.headers["X-Sidecar-Fallback"] == "cache":
            body = await resp.read()
            if resp.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            assert body == b'{"label": 1}'
        else:
            assert await resp.json() == {"label": -1}


async def test_cache_keeps_models_apart_and_answers_with_this_requests_id(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """One prefix route serves several models: model B never gets model A's cached
    answer, and a cached V2 answer carries the asking request's id, not the first's."""
    state = {"up": True}

    async def v2_model(request: web.Request) -> web.Response:
        if not state["up"]:
            return web.json_response({"error": "down"}, status=503)
        payload = await request.json()
        name = request.path.split("/")[3]
        return web.json_response({"model_name": name, "id": payload.get("id"), "outputs": []})

    for name in ("a", "b"):
        fake_model.on(f"/v2/models/{name}/infer", v2_model)
    config = cache_then_static(fake_model.url, protocol="v2")
    sidecar = await start_sidecar(config)
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
    async with sidecar.session.post(
        sidecar.url + "/v2/models/a/infer", json={**body, "id": "first"}
    ) as resp:
        assert (await resp.json())["id"] == "first"
    state["up"] = False
    async with sidecar.session.post(
        sidecar.url + "/v2/models/a/infer", json={**body, "id": "second"}
    ) as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "cache"
        assert await resp.json() == {"model_name": "a", "id": "second", "outputs": []}
    async with sidecar.session.post(sidecar.url + "/v2/models/a/infer", json=body) as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "cache"
        assert "id" not in await resp.json()  # this request named none
    async with sidecar.session.post(
        sidecar.url + "/v2/models/b/infer", json={**body, "id": "first"}
    ) as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"


async def secondary_fallback(
    make_fake_model: MakeFakeModel,
    start_sidecar: StartSidecar,
    step_timeout: str | None = None,
    **secondary: Any,
) -> tuple[SidecarHandle, FakeModel, dict[str, Any]]:
    """A sidecar whose model answers 503, with a fallback chain of the secondary model
    ``simple`` (its step's timeout, when given; ``secondary``: more of its upstream's
    settings), then the static answer: the sidecar, the secondary's fake (each test
    sets its answers) and the config."""
    primary, simple = await make_fake_model(), await make_fake_model()
    primary.on("/infer", status_handler(503))
    step: dict[str, Any] = {"name": "simple"}
    if step_timeout is not None:
        step["timeout"] = step_timeout
    config = config_with(
        primary.url,
        {"fallback": {"chain": [{"upstream": step}, STATIC]}},
        breaker={"enabled": False},
    )
    config["upstreams"]["simple"] = {"url": simple.url, **secondary}
    return await start_sidecar(config), simple, config


async def test_secondary_upstream_answers_when_the_primary_fails(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar, simple, _ = await secondary_fallback(make_fake_model, start_sidecar, step_timeout="1s")

    async def simple_answer(request: web.Request) -> web.Response:
        return web.json_response({"label": 1, "model": "simple"})

    simple.on("/infer", simple_answer)
    async with sidecar.session.post(
        sidecar.url + "/infer?v=1", json={"x": 1}, headers={"X-Request-ID": "fb-1"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Fallback"] == "simple"
        assert await resp.json() == {"label": 1, "model": "simple"}
    hit = simple.hits_for("/infer")[0]
    assert hit.target == "/infer?v=1"
    assert hit.headers["x-request-id"] == ["fb-1"]
    assert hit.body == b'{"x": 1}'


async def test_a_secondary_models_non_2xx_fails_the_step_but_its_verdict_on_the_input_stands(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    # The primary is down; the secondary model cannot answer either (it does not serve
    # the path, it is overloaded, it is down): its 404, 429 or 503 is no answer, the
    # next step is. Its 400 or 422 is about the input, which the primary would have
    # refused too: passed on, never replaced by a made-up prediction.
    sidecar, simple, _ = await secondary_fallback(make_fake_model, start_sidecar, step_timeout="1s")
    for status in (404, 429, 401, 503, 500):
        simple.on("/infer", status_handler(status))
        async with sidecar.session.post(sidecar.url + "/infer", json={"x": 1}) as resp:
            assert (resp.status, resp.headers["X-Sidecar-Fallback"]) == (200, "default-answer")
            assert await resp.json() == {"label": -1}
    for status in (400, 422):
        simple.on("/infer", status_handler(status))
        async with sidecar.session.post(sidecar.url + "/infer", json={"x": 1}) as resp:
            assert (resp.status, resp.headers["X-Sidecar-Fallback"]) == (status, "simple")
            assert await resp.json() == {"status": status}
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_fallback_total", route="infer", rule="default-answer") == 5
    assert metric_value(text, "sidecar_fallback_total", route="infer", rule="simple") == 2


async def test_a_failing_secondary_model_opens_its_own_breaker_and_its_step_is_skipped(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """The secondary step called its model whatever that model's breaker said: one
    that hung cost every fallback the step's whole timeout, and its failures were
    counted nowhere. Now its timeouts count on its own breaker; once that is open
    the step is skipped at once and the next step answers."""
    sidecar, simple, _ = await secondary_fallback(
        make_fake_model,
        start_sidecar,
        step_timeout="300ms",
        breaker={"failures": 2, "reset_timeout": "1h"},
    )
    release = asyncio.Event()
    simple.on("/infer", hanging_until(release))
    try:
        for asked in (1, 2, 2, 2):
            async with sidecar.session.post(sidecar.url + "/infer", json={"x": 1}) as resp:
                assert (resp.status, resp.headers["X-Sidecar-Fallback"]) == (200, "default-answer")
            assert len(simple.hits_for("/infer")) == asked
    finally:
        release.set()
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_circuit_state", upstream="simple") == 2
    assert metric_value(text, "sidecar_fallback_total", route="infer", rule="default-answer") == 4


async def open_the_secondarys_circuit(sidecar: SidecarHandle) -> UpstreamBreaker:
    """Send one request that the secondary model ``simple`` fails (its breaker opens
    at one failure) and the static answer answers; that breaker, now open."""
    async with sidecar.session.post(sidecar.url + "/infer", json={"x": 1}) as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
    breaker = sidecar.running.runtime.guards["simple"].breaker
    assert breaker is not None
    assert breaker.state == OPEN
    return breaker


async def test_a_client_leaving_mid_probe_of_a_secondary_frees_the_probe_for_its_own_route(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """The secondary model is also a route's own upstream, so both share its breaker.
    With the circuit's reset timeout over, a fallback call takes its one half-open
    probe and hangs; the client leaves. The probe must be given back: the route that
    the secondary serves directly probes it next (and closes the circuit), rather
    than answering 503 circuit_open for as long as the sidecar runs."""
    clock = FakeClock()
    primary, simple = await make_fake_model(), await make_fake_model()
    primary.on("/infer", status_handler(503))
    simple.on("/infer", status_handler(503))
    simple.on("/direct/infer", status_handler(200))
    config = config_with(
        primary.url,
        {"fallback": {"chain": [{"upstream": {"name": "simple"}}, STATIC]}},
        breaker={"enabled": False},
    )
    config["upstreams"]["simple"] = {
        "url": simple.url,
        "breaker": {"failures": 1, "reset_timeout": "10s", "half_open_probes": 1},
    }
    config["routes"].insert(0, {"name": "direct", "path_prefix": "/direct/", "upstream": "simple"})
    sidecar = await start_sidecar(config, clock=clock)
    breaker = await open_the_secondarys_circuit(sidecar)
    clock.advance(11)
    release = asyncio.Event()
    simple.on("/infer", hanging_until(release))
    request = (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    [(_, writer)] = await clients_that_sent(sidecar.running.main_port, request, 1)
    try:
        for _ in range(200):  # the fallback call is at the secondary, holding the probe
            if len(simple.hits_for("/infer")) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(simple.hits_for("/infer")) == 2
    finally:
        writer.close()  # the client leaves mid-call
    for _ in range(200):
        if sidecar.running.runtime.active == 0:
            break
        await asyncio.sleep(0.01)
    assert sidecar.running.runtime.active == 0
    try:
        async with sidecar.session.post(sidecar.url + "/direct/infer", json={"x": 1}) as resp:
            assert resp.status == 200  # the probe, answered by the model
            assert "X-Sidecar-Fallback" not in resp.headers
    finally:
        release.set()
    assert breaker.state == CLOSED
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_circuit_state", upstream="simple") == 0


async def test_the_models_own_answer_relayed_after_the_fallback_failed_has_its_own_time(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """The model's 503 came at once; the secondary model was asked, went silent for
    its step's 1 s, and the model's 503 went to the client after all. Its
    Server-Timing (and access log) upstream time was counted from the model's
    attempt to the relay: the secondary's second was reported as the model's."""
    primary, simple = await make_fake_model(), await make_fake_model()
    release = asyncio.Event()
    primary.on("/infer", status_handler(503))
    simple.on("/infer", hanging_until(release))
    config = config_with(
        primary.url,
        {"fallback": {"chain": [{"upstream": {"name": "simple", "timeout": "1s"}}]}},
        breaker={"enabled": False},
    )
    config["upstreams"]["simple"] = {"url": simple.url}
    sidecar = await start_sidecar(config)
    try:
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.status == 503
            assert await resp.json() == {"status": 503}  # the model's own answer
            timing = dict(
                part.strip().split(";dur=") for part in resp.headers["Server-Timing"].split(",")
            )
    finally:
        release.set()
    assert float(timing["total"]) >= 1000  # the secondary's step was waited for
    assert float(timing["upstream"]) < 500  # but it was not the model's time


async def test_a_secondary_model_cannot_drop_the_fallback_header(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    # The secondary's Connection field lists X-Sidecar-Fallback: the relay drops the
    # fields a Connection lists, and the stamp went with them, so the client could not
    # tell a fallback answered.
    sidecar, simple, _ = await secondary_fallback(make_fake_model, start_sidecar)

    async def listing(request: web.Request) -> web.Response:
        headers = {"Connection": "X-Sidecar-Fallback, X-Hop", "X-Hop": "1"}
        return web.json_response({"label": 1}, headers=headers)

    simple.on("/infer", listing)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 200
        assert resp.headers.get("X-Sidecar-Fallback") == "simple"
        assert "X-Hop" not in resp.headers
        assert await resp.json() == {"label": 1}


async def test_a_client_leaving_during_the_secondary_fallback_frees_the_primarys_connection(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    # The primary's 503 is held while the secondary model is asked; a client that
    # leaves meanwhile must not take the primary's connection slot with it.
    primary, simple = await make_fake_model(), await make_fake_model()
    primary.on("/infer", status_handler(503))
    asked = asyncio.Event()
    never = asyncio.Event()

    async def slow_secondary(request: web.Request) -> web.Response:
        asked.set()
        await never.wait()
        return web.json_response({"label": 1})

    simple.on("/infer", slow_secondary)
    config = config_with(
        primary.url,
        {
            "timeout": "1s",
            "fallback": {"chain": [{"upstream": {"name": "simple", "timeout": "5s"}}]},
        },
        breaker={"enabled": False},
        max_connections=1,
    )
    config["upstreams"]["simple"] = {"url": simple.url}
    sidecar = await start_sidecar(config)
    leaving = asyncio.create_task(sidecar.session.post(sidecar.url + "/infer", data=b"{}"))
    await asyncio.wait_for(asked.wait(), 10)
    leaving.cancel()  # the client closes its connection
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    pool = sidecar.running.runtime.upstreams["model"].pool
    for _ in range(100):  # the sidecar notices the client left
        if pool.open == 0:
            break
        await asyncio.sleep(0.02)
    assert pool.open == 0
    primary.on("/infer", status_handler(200))
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 200  # not a 504 waiting for a connection slot that never frees
    never.set()


async def test_a_client_leaving_while_a_retried_answer_is_drained_frees_its_connection(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    # A 503 to be retried is read to its end first (to keep the connection); its body
    # stalls, and the client leaves meanwhile: the slot must come free.
    stalled = asyncio.Event()
    never = asyncio.Event()

    fake_model.on("/infer", stalling_answer(never, status=503, started=stalled))
    config = config_with(
        fake_model.url,
        {"timeout": "5s", "idle_timeout": "5s", "retryable": True, "retry": {"attempts": 2}},
        breaker={"enabled": False},
        max_connections=1,
    )
    sidecar = await start_sidecar(config)
    leaving = asyncio.create_task(sidecar.session.post(sidecar.url + "/infer", data=b"{}"))
    await asyncio.wait_for(stalled.wait(), 10)
    await asyncio.sleep(0.1)
    leaving.cancel()  # the client closes its connection
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    pool = sidecar.running.runtime.upstreams["model"].pool
    for _ in range(100):  # the sidecar notices the client left
        if pool.open == 0:
            break
        await asyncio.sleep(0.02)
    assert pool.open == 0
    never.set()


async def test_an_answer_broken_off_before_it_reached_the_client_falls_back(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    # A small answer is read whole before it is relayed: when the model breaks it off
    # or goes silent in its body, nothing has reached the client yet, and the route's
    # fallback (upstream_error, timeout) answers instead of a 502/504.
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"outputs": ')
        assert request.transport is not None
        request.transport.close()
        return response

    never = asyncio.Event()
    fake_model.on("/cut", cut)
    fake_model.on("/stalled", stalling_answer(never))
    config = config_with(fake_model.url, {"idle_timeout": "200ms", "fallback": {"chain": [STATIC]}})
    sidecar = await start_sidecar(config)
    for path in ("/cut", "/stalled"):
        async with sidecar.session.post(sidecar.url + path, data=b"{}") as resp:
            assert resp.status == 200, path
            assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
            assert await resp.json() == {"label": -1}
    # Without a fallback the client still gets the sidecar's own error.
    config = config_with(fake_model.url, {"idle_timeout": "200ms"})
    sidecar = await start_sidecar(config)
    for path, status, kind in (
        ("/cut", 502, "upstream_error"),
        ("/stalled", 504, "upstream_timeout"),
    ):
        async with sidecar.session.post(sidecar.url + path, data=b"{}") as resp:
            assert resp.status == status
            assert (await resp.json())["error"]["type"] == kind
    never.set()


async def test_a_secondary_models_large_answer_streams_through_unheld(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    # A secondary model's answer is relayed as the primary's are: a 48 MiB one, with a
    # Content-Length or chunked, reaches the client whole without being held whole.
    # One declaring more than the step's max_body_size fails the step (counted).
    import tracemalloc

    sidecar, simple, config = await secondary_fallback(
        make_fake_model, start_sidecar, step_timeout="10s"
    )
    big = b"x" * (48 * 1024 * 1024)

    async def huge(request: web.Request) -> web.StreamResponse:
        # Written in pieces, so the fake server holds no copy of its own.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if request.query.get("chunked"):
            response.enable_chunked_encoding()
        else:
            response.content_length = len(big)
        await response.prepare(request)
        view = memoryview(big)
        for start in range(0, len(big), 1 << 16):
            await response.write(view[start : start + (1 << 16)])
        return response

    simple.on("/infer", huge)
    tracemalloc.start()
    try:
        for target in ("/infer", "/infer?chunked=1"):
            async with sidecar.session.post(sidecar.url + target, data=b"{}") as resp:
                assert resp.status == 200
                assert resp.headers["X-Sidecar-Fallback"] == "simple"
                received = 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    received += len(chunk)
            assert received == len(big), target
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB"

    config["routes"][0]["fallback"]["chain"][0]["upstream"]["max_body_size"] = "4MiB"
    sidecar.running.runtime.loaded.path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"  # the next step
        assert await resp.json() == {"label": -1}
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_dropped_total", buffer="fallback_too_large") == 1


async def test_a_secondary_models_stream_is_relayed_as_it_comes(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    # An LLM fallback's tokens reach the client as the secondary model writes them,
    # not once its whole answer is in.
    sidecar, simple, _ = await secondary_fallback(make_fake_model, start_sidecar)
    more = asyncio.Event()

    async def tokens(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"token": "first"}\n\n')
        await asyncio.wait_for(more.wait(), 10)
        await response.write(b"data: [DONE]\n\n")
        return response

    simple.on("/infer", tokens)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Fallback"] == "simple"
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert first == b'data: {"token": "first"}\n\n'
        more.set()
        assert await resp.content.read() == b"data: [DONE]\n\n"
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_fallback_total", route="infer", rule="simple") == 1


async def test_answers_that_stall_in_their_body_open_the_breaker(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    # A model that sends its head, then goes silent: each request waits idle_timeout
    # (the upstream's read_timeout, 30 s by default) before its fallback. Like a model
    # silent before its head, it is unavailable, and the circuit must open.
    never = asyncio.Event()
    fake_model.on("/infer", stalling_answer(never))
    config = config_with(
        fake_model.url,
        {"idle_timeout": "200ms", "fallback": {"chain": [STATIC]}},
        breaker={"failures": 2, "reset_timeout": "1h"},
    )
    sidecar = await start_sidecar(config)
    try:
        for _ in range(3):
            async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
                assert resp.status == 200
                assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
        assert len(fake_model.hits_for("/infer")) == 2  # the third was not sent
        breaker = sidecar.running.runtime.guards["model"].breaker
        assert breaker is not None
        assert breaker.state == OPEN
    finally:
        never.set()


@pytest.mark.parametrize("how", ["stalls", "breaks-off"])
async def test_streams_the_model_cuts_short_open_the_breaker(
    fake_model: FakeModel, start_sidecar: StartSidecar, how: str
) -> None:
    """A streamed answer the model breaks off, or goes silent in for idle_timeout,
    after its head: the model is unavailable, as for an answer read whole (above).
    Its head counted as a success and the cut as nothing, so an LLM server whose
    engine hangs after the first event never opened the circuit."""
    never = asyncio.Event()

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        if how == "stalls":
            await never.wait()
        assert request.transport is not None
        request.transport.close()
        return response

    fake_model.on("/stream", cut)
    config = config_with(
        fake_model.url, {"idle_timeout": "200ms"}, breaker={"failures": 2, "reset_timeout": "1h"}
    )
    sidecar = await start_sidecar(config)
    try:
        for _ in range(2):
            async with sidecar.session.post(sidecar.url + "/stream", data=b"{}") as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
        async with sidecar.session.post(sidecar.url + "/stream", data=b"{}") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["type"] == "circuit_open"
        assert len(fake_model.hits_for("/stream")) == 2
    finally:
        never.set()


async def test_overload_is_refused_at_once_with_retry_after(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    gate = asyncio.Event()
    arrived = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        if len(fake_model.hits_for("/infer")) == 2:
            arrived.set()
        await gate.wait()
        return web.json_response({"ok": True})

    fake_model.on("/infer", held)
    config = base_config(fake_model.url, server={"overload_retry_after": "2s"})
    config["routes"] = [
        route(max_in_flight=2),
        {
            "name": "shed-to-fallback",
            "path_prefix": "/soft",
            "upstream": "model",
            "max_in_flight": 1,
            "fallback": {"triggers": ["overloaded"], "chain": [STATIC]},
        },
    ]
    config["routes"].reverse()
    sidecar = await start_sidecar(config)
    held_requests = [
        asyncio.create_task(sidecar.session.post(sidecar.url + "/infer", data=b"{}"))
        for _ in range(2)
    ]
    await asyncio.wait_for(arrived.wait(), 10)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "2"
        assert (await resp.json())["error"]["type"] == "overloaded"
    assert len(fake_model.hits_for("/infer")) == 2

    soft_arrived = asyncio.Event()

    async def soft_held_answer(request: web.Request) -> web.Response:
        soft_arrived.set()
        await gate.wait()
        return web.json_response({"ok": True})

    fake_model.on("/soft", soft_held_answer)
    soft_held = asyncio.create_task(sidecar.session.post(sidecar.url + "/soft", data=b"{}"))
    await asyncio.wait_for(soft_arrived.wait(), 10)
    async with sidecar.session.post(sidecar.url + "/soft", data=b"{}") as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
    gate.set()
    for task in [*held_requests, soft_held]:
        async with await task as resp:
            assert resp.status == 200


async def test_an_overload_refusal_names_the_cap_that_refused_it(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """The server-wide cap's 503 named a route ("for route 'all'", the route the
    request happened to take); it names the server's cap, and a route's own cap
    names the route, in the route's protocol shape. A shed request whose fallback
    finds nothing is refused with the same message."""
    gate = asyncio.Event()
    held_count = 0
    both_held = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        nonlocal held_count
        held_count += 1
        if held_count == 2:
            both_held.set()
        await gate.wait()
        return web.json_response({"ok": True})

    fake_model.on("/hold", held)
    config = base_config(fake_model.url, server={"max_in_flight": 2})
    config["routes"] = [
        {"name": "hold", "path_prefix": "/hold", "upstream": "model"},
        {"name": "chat", "path_prefix": "/chat", "upstream": "model", "protocol": "openai"},
        {"name": "v2", "path_prefix": "/v2", "upstream": "model", "protocol": "v2"},
        {
            "name": "cached",
            "path_prefix": "/cached",
            "upstream": "model",
            "fallback": {"triggers": ["overloaded"], "chain": [{"cache": {"ttl": "1h"}}]},
        },
        {"name": "all", "path_prefix": "/", "upstream": "model", "max_in_flight": 1},
    ]
    sidecar = await start_sidecar(config)
    server_message = "too many requests in flight on this server (server.max_in_flight)"
    held_requests = [
        asyncio.create_task(sidecar.session.post(sidecar.url + "/hold", data=b"{}"))
        for _ in range(2)
    ]
    try:
        await asyncio.wait_for(both_held.wait(), 10)
        headers = {"X-Request-ID": "req-chat"}
        async with sidecar.session.post(sidecar.url + "/chat", data=b"{}", headers=headers) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            assert (await r.json())["error"] == {
                "message": server_message,
                "type": "overloaded",
                "param": None,
                "code": "overloaded",
                "request_id": "req-chat",
            }
        headers = {"X-Request-ID": "req-v2"}
        async with sidecar.session.post(sidecar.url + "/v2", data=b"{}", headers=headers) as r:
            assert r.status == 503
            assert await r.json() == {
                "error": server_message,
                "type": "overloaded",
                "request_id": "req-v2",
            }
        headers = {"X-Request-ID": "req-cached"}
        async with sidecar.session.post(sidecar.url + "/cached", data=b"{}", headers=headers) as r:
            assert r.status == 503  # shed; the empty cache has no answer
            assert (await r.json())["error"] == {
                "type": "overloaded",
                "message": server_message,
                "request_id": "req-cached",
            }
    finally:
        gate.set()
        for response in await asyncio.gather(*held_requests):
            assert response.status == 200
            response.release()
    assert len(fake_model.hits_for("/chat")) == len(fake_model.hits_for("/cached")) == 0

    # The server has room; the route "all" (max_in_flight 1) has one request out.
    gate.clear()
    held_count = 1
    both_held.clear()
    fake_model.on("/all/hold", held)
    first = asyncio.create_task(sidecar.session.post(sidecar.url + "/all/hold", data=b"{}"))
    try:
        await asyncio.wait_for(both_held.wait(), 10)
        headers = {"X-Request-ID": "req-all"}
        async with sidecar.session.post(sidecar.url + "/all/x", data=b"{}", headers=headers) as r:
            assert r.status == 503
            assert (await r.json())["error"] == {
                "type": "overloaded",
                "message": "too many requests in flight for route 'all' (its max_in_flight)",
                "request_id": "req-all",
            }
    finally:
        gate.set()
        async with await first as response:
            assert response.status == 200


async def test_a_stream_that_sent_bytes_is_never_retried(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        assert request.transport is not None
        request.transport.close()
        return response

    fake_model.on("/stream", broken)
    config = config_with(fake_model.url, {"retryable": True, "retry": {"attempts": 3}})
    sidecar = await start_sidecar(config)
    received = b""
    async with sidecar.session.post(sidecar.url + "/stream", data=b"{}") as resp:
        try:
            async for chunk in resp.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError:
            pass
    assert received == b"data: one\n\n"
    assert len(fake_model.hits_for("/stream")) == 1


# -- the breaker's accounting, in-process (no sockets needed for its arithmetic) ---------


def _breaker(failures: int) -> tuple[UpstreamBreaker, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = BreakerSettings(failures=failures, reset_timeout="60s")
    return UpstreamBreaker("model", settings, Metrics(registry), clock=FakeClock()), registry


def _transitions(registry: CollectorRegistry, old: str, new: str) -> float:
    labels = {"upstream": "model", "from_state": old, "to_state": new}
    return registry.get_sample_value("sidecar_circuit_transitions_total", labels) or 0.0


async def _fail(probe: bool) -> str:
    raise BreakerFailure(RuntimeError("model down"))


async def _succeed(probe: bool) -> str:
    return "ok"


async def test_breaker_counts_consecutive_failures_and_a_success_resets_them() -> None:
    breaker, _ = _breaker(failures=3)
    for outcome in (_fail, _fail, _succeed, _fail, _fail):
        with contextlib.suppress(BreakerFailure):
            await breaker.call(outcome)
    assert breaker.state == CLOSED  # never three failures in a row
    with contextlib.suppress(BreakerFailure):
        await breaker.call(_fail)
    assert breaker.state == OPEN


async def test_breaker_ignores_cancellation_and_late_results_from_before_a_trip() -> None:
    breaker, registry = _breaker(failures=2)
    release = asyncio.Event()

    async def slow(outcome: Callable[[bool], Awaitable[str]]) -> str:
        async def attempt(probe: bool) -> str:
            await release.wait()
            return await outcome(probe)

        return await breaker.call(attempt)

    late_failure = asyncio.create_task(slow(_fail))
    late_success = asyncio.create_task(slow(_succeed))
    cancelled = asyncio.create_task(slow(_succeed))
    await asyncio.sleep(0)  # all three are inside the breaker, circuit closed
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    for _ in range(2):
        with contextlib.suppress(BreakerFailure):
            await breaker.call(_fail)
    assert breaker.state == OPEN
    assert _transitions(registry, "closed", "open") == 1
    release.set()
    assert await late_success == "ok"  # the answer still reaches its caller ...
    with contextlib.suppress(BreakerFailure):
        await late_failure
    assert breaker.state == OPEN  # ... but neither closes nor re-opens the circuit
    assert _transitions(registry, "closed", "open") == 1
    assert _transitions(registry, "open", "open") == 0
    try:
        await breaker.call(_succeed)
    except errors.CircuitOpen:
        pass
    else:
        raise AssertionError("an open circuit let a call through")


async def test_a_cancelled_half_open_probe_leaves_the_circuit_half_open() -> None:
    """pybreaker takes an excluded exception for a success: a probe whose client went
    away would close the circuit on a model nobody heard from."""
    registry = CollectorRegistry()
    clock = FakeClock()
    settings = BreakerSettings(failures=1, reset_timeout="10s")
    breaker = UpstreamBreaker("model", settings, Metrics(registry), clock=clock)
    with contextlib.suppress(BreakerFailure):
        await breaker.call(_fail)
    assert breaker.state == OPEN
    clock.advance(10)
    entered = asyncio.Event()

    async def hanging_probe(probe: bool) -> str:
        assert probe
        entered.set()
        await asyncio.Event().wait()
        return "never"

    probe = asyncio.create_task(breaker.call(hanging_probe))
    await entered.wait()
    assert breaker.state == "half-open"
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    assert breaker.state == "half-open"  # not closed: nobody heard from the model
    assert _transitions(registry, "half-open", "closed") == 0
    with contextlib.suppress(BreakerFailure):
        await breaker.call(_fail)  # the next request is the probe, and it fails
    assert breaker.state == OPEN
    clock.advance(10)
    assert await breaker.call(_succeed) == "ok"
    assert breaker.state == CLOSED


async def test_client_errors_never_open_the_breaker_nor_get_a_made_up_answer(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """MLServer answers 500 to a wrong-shape tensor, llama.cpp 500 to malformed
    messages: the model's answer to that input. It passes through, counts nothing
    against the upstream, and no fallback invents a prediction for it."""

    async def rejects(request: web.Request) -> web.Response:
        return web.json_response({"error": "shape mismatch"}, status=500)

    fake_model.on("/infer", rejects)
    fake_model.on("/bad", status_handler(422))
    config = config_with(
        fake_model.url,
        {"retryable": True, "fallback": {"chain": [STATIC]}},
        breaker={"failures": 2},
    )
    sidecar = await start_sidecar(config)
    for path in ("/infer", "/bad") * 5:
        async with sidecar.session.post(sidecar.url + path, data=b"{}") as resp:
            assert resp.status in (500, 422)
            assert "X-Sidecar-Fallback" not in resp.headers
    breaker = sidecar.running.runtime.guards["model"].breaker
    assert breaker is not None
    assert breaker.state == CLOSED
    assert len(fake_model.hits_for("/infer")) == 5  # 500 is not retried either

    # What counts is configurable: an upstream whose 500 means "unavailable".
    config["upstreams"]["model"]["breaker"]["failure_statuses"] = [500, 503]
    config["routes"][0]["fallback"]["statuses"] = [500]
    strict = await start_sidecar(config)
    for _ in range(2):
        async with strict.session.post(strict.url + "/infer", data=b"{}") as resp:
            assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
    breaker = strict.running.runtime.guards["model"].breaker
    assert breaker is not None
    assert breaker.state == OPEN


def test_the_fallback_cache_is_bounded_in_bytes_and_counts_what_it_evicts() -> None:
    from sidecar.config.schema import CacheFallback
    from sidecar.upstream.fallback import ResponseCache

    registry = CollectorRegistry()
    evicted = Metrics(registry).dropped.labels("fallback_cache", "infer")
    cache = ResponseCache(
        CacheFallback(max_bytes="1KiB", max_body_size="1KiB"), "plain", FakeClock(), evicted
    )
    for index in range(3):
        cache.store("POST", "/infer", b'{"n": %d}' % index, 200, None, b"x" * 500)
    assert cache.size_bytes == 1000
    assert len(cache) == 2
    assert cache.answer("POST", "/infer", b'{"n": 0}', "r") is None  # the oldest went
    assert cache.answer("POST", "/infer", b'{"n": 2}', "r") is not None
    labels = {"buffer": "fallback_cache", "route": "infer"}
    assert registry.get_sample_value("sidecar_dropped_total", labels) == 1


class _HighestDraw:
    """An rng whose draw is always the top of the range asked for (and records it)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.ranges.append((low, high))
        return high


def test_full_jitter_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    from sidecar.config.schema import RetryPolicy
    from sidecar.upstream.retry import backoff_delay

    policy = RetryPolicy(backoff_base="25ms", backoff_max="250ms")
    rng = _HighestDraw()
    ceilings = [backoff_delay(policy, n, rng) for n in range(1, 7)]  # type: ignore[arg-type]
    assert ceilings == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25, 0.25])
    assert {low for low, _ in rng.ranges} == {0.0}  # full jitter: from zero


def test_retry_after_in_seconds_or_as_a_date() -> None:
    from email.utils import parsedate_to_datetime

    from sidecar.upstream.retry import parse_retry_after

    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 7 ") == 7.0
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    moment = parsedate_to_datetime(date).timestamp()
    assert parse_retry_after(date, now=moment - 30) == pytest.approx(30.0)
    assert parse_retry_after(date, now=moment + 30) == 0.0  # already past: no wait
    for nonsense in (None, "", "soon", "-5"):
        assert parse_retry_after(nonsense) is None, nonsense


def test_the_retry_budget_is_a_share_of_requests_in_flight_with_a_floor() -> None:
    from sidecar.config.schema import RetryBudgetSettings
    from sidecar.upstream.retry import RetryBudget

    budget = RetryBudget(RetryBudgetSettings(ratio=0.2, min_retries=3))
    budget.active_requests = 2
    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]  # the floor
    for _ in range(3):
        budget.release()
    budget.active_requests = 100
    assert sum(budget.try_acquire() for _ in range(25)) == 20  # 20% of 100 in flight
    assert budget.active_retries == 20


def test_a_new_retry_budget_starts_with_nothing_in_flight() -> None:
    from sidecar.config.schema import RetryBudgetSettings
    from sidecar.upstream.retry import RetryBudget

    budget = RetryBudget(RetryBudgetSettings(ratio=1.0, min_retries=0))
    assert sum(budget.try_acquire() for _ in range(3)) == 0  # no request, no retry
    for _ in range(4):
        budget.active_requests += 1  # as four requests start
    assert sum(budget.try_acquire() for _ in range(10)) == 4
