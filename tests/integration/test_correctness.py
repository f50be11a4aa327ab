"""Defects found in front of real servers, with hostile peers and in review (issue 13),
each with the test that would have caught it."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web

from sidecar.config.schema import ConfigError, parse_config
from sidecar.pipeline.auth import hash_key
from tests.conftest import (
    LOOPBACK,
    FakeModel,
    MakeFakeModel,
    StartSidecar,
    base_config,
    closed_port,
    unanswered_port,
)
from tests.integration.test_endpoints import metric_value


class ListSink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.records += [orjson.loads(line) for line in data.splitlines()]

    def close(self) -> None:
        pass


async def flushed(sidecar: Any, sink: ListSink, count: int) -> list[dict[str, Any]]:
    """The access records once ``count`` have been written (bounded wait)."""
    for _ in range(200):
        if len(sink.records) >= count:
            return sink.records
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {len(sink.records)} of {count} access records written")


# -- 5: secrets reach only their own upstream ------------------------------------------


async def test_shadow_and_secondary_fallback_carry_their_own_headers(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    primary, candidate, simple = [await make_fake_model() for _ in range(3)]
    primary.on("/infer", lambda request: _answer(503))
    config = base_config(primary.url)
    config["upstreams"]["model"]["headers"] = {"Authorization": "Bearer primary-secret"}
    config["upstreams"]["model"]["breaker"] = {"enabled": False}
    config["upstreams"]["candidate"] = {
        "url": candidate.url,
        "headers": {"X-Api-Key": "candidate-secret"},
    }
    config["upstreams"]["simple"] = {"url": simple.url}
    config["routes"][0]["shadow"] = {
        "upstream": "candidate",
        "fraction": 1.0,
        "timeout": "3s",
        "governor": {"enabled": False},
    }
    config["routes"][0]["timeout"] = "4s"
    config["routes"][0]["fallback"] = {"chain": [{"upstream": {"name": "simple", "timeout": "2s"}}]}
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(
        sidecar.url + "/infer", data=b"{}", headers={"X-Sidecar-Shadow": "0"}
    ) as resp:
        assert resp.headers["X-Sidecar-Fallback"] == "simple"
    mirror = sidecar.running.runtime.paths["all"].shadow
    assert mirror is not None
    await asyncio.wait_for(mirror.wait_idle(), 10)
    (to_primary,) = primary.hits_for("/infer")
    (to_shadow,) = candidate.hits_for("/infer")
    (to_simple,) = simple.hits_for("/infer")
    assert to_primary.headers["authorization"] == ["Bearer primary-secret"]
    assert "x-sidecar-shadow" not in to_primary.headers  # the client's copy is dropped
    assert to_shadow.headers["x-api-key"] == ["candidate-secret"]
    assert to_shadow.headers["x-sidecar-shadow"] == ["1"]
    for hit in (to_shadow, to_simple):
        assert "authorization" not in hit.headers
    # Each carries its own deadline: the shadow's 3s, the fallback's 2s.
    assert to_shadow.headers["x-sidecar-timeout-ms"] == ["3000"]
    assert to_simple.headers["x-sidecar-timeout-ms"] == ["2000"]


def _answer(status: int, body: Any = None) -> Any:
    async def respond() -> web.Response:
        return web.json_response(body if body is not None else {"status": status}, status=status)

    return respond()


# -- 7: what the access log and metrics say --------------------------------------------


async def test_fallback_answers_are_logged_with_their_size_and_timeouts_name_the_wait(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    fake_model.on("/hang", hang)
    fake_model.on("/down", lambda request: _answer(503))
    sink = ListSink()
    config = base_config(fake_model.url)
    config["routes"] = [
        {
            "name": "down",
            "path_prefix": "/down",
            "upstream": "model",
            "fallback": {"chain": [{"static": {"body": {"label": 0}}}]},
        },
        {
            "name": "hang",
            "path_prefix": "/hang",
            "upstream": "model",
            "timeout": "600ms",
            "per_try_timeout": "250ms",
            "retryable": True,
            "retry": {"attempts": 2, "backoff_base": "1ms", "backoff_max": "1ms"},
        },
    ]
    config["upstreams"]["model"]["breaker"] = {"enabled": False}
    sidecar = await start_sidecar(config, log_sinks={"access": sink})
    async with sidecar.session.post(sidecar.url + "/down", data=b"{}") as resp:
        fallback_body = await resp.read()
    async with sidecar.session.post(sidecar.url + "/hang", data=b"{}") as resp:
        assert resp.status == 504
        message = (await resp.json())["error"]["message"]
    release.set()
    assert re.fullmatch(
        r"upstream 'model' did not start answering: waited 0\.5\d*s over 2 attempt\(s\), "
        r"0\.25s per attempt",
        message,
    ), message
    records = await flushed(sidecar, sink, 2)
    by_route = {r["route"]: r for r in records}
    assert by_route["down"]["outcome"] == "fallback"
    assert by_route["down"]["bytes_out"] == len(fallback_body) > 0


async def test_a_secondary_models_answer_is_timed_as_its_own(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """A secondary model's relayed answer took its upstream time from the primary's
    attempt: 1 s of the primary hanging counted as the secondary's (upstream_ms,
    Server-Timing), and with the circuit open (the primary not asked) there was none
    at all. It is the secondary's own, from when it was asked."""
    primary, simple = await make_fake_model(), await make_fake_model()
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async def quick(request: web.Request) -> web.Response:
        return web.json_response({"label": 1})

    primary.on("/infer", hang)
    simple.on("/infer", quick)
    sink = ListSink()
    config = base_config(primary.url)
    config["upstreams"]["model"]["breaker"] = {"failures": 1, "reset_timeout": "1h"}
    config["upstreams"]["simple"] = {"url": simple.url}
    config["routes"][0]["timeout"] = "1s"
    config["routes"][0]["fallback"] = {"chain": [{"upstream": {"name": "simple", "timeout": "5s"}}]}
    sidecar = await start_sidecar(config, log_sinks={"access": sink})
    timings = []
    for _ in range(2):  # the primary times out (and opens the circuit), then it is open
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.headers["X-Sidecar-Fallback"] == "simple"
            timings.append(resp.headers["Server-Timing"])
    release.set()
    records = await flushed(sidecar, sink, 2)
    assert [r["breaker"] for r in records] == ["closed", "open"]
    assert records[0]["duration_ms"] >= 1000  # the primary's wait, then the secondary
    for record, timing in zip(records, timings, strict=True):
        assert record["upstream_ms"] is not None, record
        assert record["upstream_ms"] < 500, record  # the primary's 1 s is not in it
        assert timing.startswith("upstream;dur="), timing
        assert float(timing.split("=")[1].split(",")[0]) < 500, timing


async def test_a_client_leaving_mid_stream_is_not_an_upstream_failure(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    first_sent = asyncio.Event()
    hold = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        first_sent.set()
        await hold.wait()
        for _ in range(50):
            await response.write(b"data: more\n\n" * 100)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    fake_model.on("/stream", stream)
    sink = ListSink()
    sidecar = await start_sidecar(base_config(fake_model.url), log_sinks={"access": sink})
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    writer.write(b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(first_sent.wait(), 10)
    assert b"data: 1" in await asyncio.wait_for(reader.read(4096), 10)
    writer.close()  # the client goes away
    hold.set()
    (record,) = await flushed(sidecar, sink, 1)
    assert record["outcome"] == "client_closed"
    assert record["status"] == 200


# -- 8, 9: values that would break the sidecar are config errors -----------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("routes", 0, "timeout"), "0s"),
        (("upstreams", "model", "health", "interval"), "0s"),
        (("upstreams", "model", "read_timeout"), "0ms"),
        (("rate_limit",), {"enabled": True, "global": {"rate": "0/s", "burst": 1}}),
        (("routes", 0, "drift"), {"baseline": "b.json", "interval": "0s"}),
    ],
)
def test_zero_timeouts_intervals_and_rates_are_refused(path: tuple[Any, ...], value: Any) -> None:
    config = base_config("http://127.0.0.1:1")
    node: Any = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(config), source="t", env={})
    assert any("more than zero" in issue.message for issue in caught.value.issues)


def test_a_json_path_compare_needs_its_path() -> None:
    config = base_config("http://127.0.0.1:1")
    config["upstreams"]["model"]["health"]["canary"] = {
        "path": "/infer",
        "expect": {},
        "compare": {"protocol": "json_path"},
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(config), source="t", env={})
    assert [str(i) for i in caught.value.issues] == [
        "upstreams.model.health.canary.compare: protocol json_path needs json_path"
    ]


async def test_the_canary_says_its_content_type_and_may_send_headers(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    async def strict(request: web.Request) -> web.Response:
        if request.content_type != "application/json" or "x-tenant" not in request.headers:
            return web.json_response({"detail": "unprocessable"}, status=422)
        return web.json_response({"outputs": [{"name": "label", "data": [0]}]})

    fake_model.on("/embed", strict)
    config = base_config(fake_model.url)
    config["upstreams"]["model"]["health"]["canary"] = {
        "path": "/embed",
        "body": {"input": "x"},
        "headers": {"X-Tenant": "probe"},
        "expect": {"outputs": [{"name": "label", "data": [0]}]},
        "compare": {"protocol": "v2", "kind": "label"},
    }
    sidecar = await start_sidecar(config)
    async with sidecar.session.get(sidecar.admin_url + "/readyz") as resp:
        assert resp.status == 200, await resp.text()


async def test_a_malformed_baseline_on_reload_is_an_invalid_reload(
    fake_model: FakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    (tmp_path / "broken.json").write_text('{"histograms": {')
    config = base_config(fake_model.url)
    config["routes"][0]["drift"] = {"baseline": str(tmp_path / "broken.json")}
    sidecar.running.runtime.loaded.path.write_text(yaml.safe_dump(config))
    async with sidecar.session.post(sidecar.admin_url + "/-/reload") as resp:
        assert resp.status == 400
        assert (await resp.json())["errors"][0].startswith("routes[0].drift.baseline:")
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "sidecar_config_reloads_total", result="invalid") == 1


# -- 12: time to first byte and silence mid-answer are separate ------------------------


def trickling_answer(stop: asyncio.Event, *, length: int, status: int = 200) -> Any:
    """A handler that sends a head with a Content-Length of ``length``, then one byte
    of the body every 0.1 s, until the body is whole or ``stop`` is set."""

    async def trickles(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        response.content_length = length
        await response.prepare(request)
        for _ in range(length):
            if stop.is_set():
                break
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response

    return trickles


def idle_limit_config(url: str, *, timeout: str) -> dict[str, Any]:
    """A route with the given deadline to a model with a 0.3 s idle limit, no breaker."""
    config = base_config(url)
    config["upstreams"]["model"]["read_timeout"] = "300ms"
    config["upstreams"]["model"]["breaker"] = {"enabled": False}
    config["routes"][0]["timeout"] = timeout
    return config


async def test_a_slow_first_byte_is_not_an_idle_timeout_and_silence_mid_answer_is(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    async def thinks_then_answers(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)  # longer than the idle limit, within the deadline
        return web.json_response({"answer": 42})

    async def stalls_mid_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"partial": ')
        await asyncio.sleep(5)
        return response

    fake_model.on("/think", thinks_then_answers)
    fake_model.on("/stall", stalls_mid_body)
    config = idle_limit_config(fake_model.url, timeout="3s")
    sidecar = await start_sidecar(config)
    async with sidecar.session.get(sidecar.url + "/think") as resp:
        assert resp.status == 200
        assert await resp.json() == {"answer": 42}
    async with sidecar.session.get(sidecar.url + "/stall") as resp:
        assert resp.status == 504
        error = (await resp.json())["error"]
    assert error["type"] == "upstream_timeout"
    assert error["message"] == ("upstream 'model' went silent for 0.3s in the middle of its answer")


async def test_a_small_answer_trickled_under_the_idle_limit_ends_at_the_attempts_limit(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A small answer is read whole before it is sent on; a model that sends one byte
    of it every 0.1 s (under the 0.3 s idle limit) must not hold the request for as
    long as it likes: the attempt's 0.6 s limit covers the whole answer, and the
    fallback answers in its place."""
    stop = asyncio.Event()
    fake_model.on("/trickle", trickling_answer(stop, length=200))  # 20 s, were it let
    config = idle_limit_config(fake_model.url, timeout="600ms")
    sidecar = await start_sidecar(config)
    async with sidecar.session.get(sidecar.url + "/trickle") as resp:
        assert resp.status == 504
        error = (await resp.json())["error"]
    stop.set()
    assert error["type"] == "upstream_timeout"
    assert error["message"] == "upstream 'model' did not finish its answer within 0.6s"
    config["routes"][0]["fallback"] = {
        "triggers": ["timeout"],
        "chain": [{"static": {"name": "default", "status": 200, "body": {"label": -1}}}],
    }
    stop.clear()
    sidecar.running.runtime.loaded.path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    async with sidecar.session.get(sidecar.url + "/trickle") as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Fallback"] == "default"
    stop.set()


async def test_a_retrys_small_answer_ends_within_what_is_left_of_the_routes_deadline(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """The first attempt hangs its 1 s; the retry has what is left of the route's 1.5 s
    (about 0.5 s), for its whole small answer too, not another 1 s past the deadline."""
    stop = asyncio.Event()
    trickles = trickling_answer(stop, length=100)

    async def hangs_then_trickles(request: web.Request) -> web.StreamResponse:
        if len(fake_model.hits_for("/infer")) == 1:
            await asyncio.wait_for(stop.wait(), 10)
        return await trickles(request)

    fake_model.on("/infer", hangs_then_trickles)
    config = idle_limit_config(fake_model.url, timeout="1500ms")
    config["routes"][0].update(
        {"retryable": True, "per_try_timeout": "1s", "retry": {"attempts": 2}}
    )
    config["routes"][0]["retry"].update({"backoff_base": "1ms", "backoff_max": "1ms"})
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 504
        message = (await resp.json())["error"]["message"]
    stop.set()
    assert len(fake_model.hits_for("/infer")) == 2
    found = re.fullmatch(r"upstream 'model' did not finish its answer within ([0-9.]+)s", message)
    assert found is not None, message
    assert float(found.group(1)) < 1.0  # what was left of 1.5 s after 1 s, not 1 s


async def test_a_small_5xx_trickled_under_the_idle_limit_ends_at_the_attempts_limit(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """The model's own 503 (a status the breaker counts), passed on with no fallback
    to answer, was read whole bounded only by the idle limit: trickled a byte every
    0.1 s it held the request 10 s on a route whose attempts have 1 s. Like any small
    answer it must arrive whole within the attempt's limit (0.6 s here)."""
    stop = asyncio.Event()
    fake_model.on("/trickle", trickling_answer(stop, status=503, length=100))  # 10 s
    sidecar = await start_sidecar(idle_limit_config(fake_model.url, timeout="600ms"))
    try:
        async with sidecar.session.get(sidecar.url + "/trickle") as resp:
            status = resp.status
            body = await resp.read()
    finally:
        stop.set()
    assert status == 504, body
    assert orjson.loads(body)["error"]["message"] == (
        "upstream 'model' did not finish its answer within 0.6s"
    )


# -- 16: sampling is not the client's to steer -----------------------------------------


async def test_the_same_request_id_is_not_always_mirrored(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    primary, candidate = await make_fake_model(), await make_fake_model()
    config = base_config(primary.url)
    config["upstreams"]["candidate"] = {"url": candidate.url}
    config["routes"][0]["shadow"] = {
        "upstream": "candidate",
        "fraction": 0.5,
        "governor": {"enabled": False},
    }
    sidecar = await start_sidecar(config)
    for _ in range(100):
        async with sidecar.session.post(
            sidecar.url + "/infer", data=b"{}", headers={"X-Request-ID": "always-the-same"}
        ):
            pass
    mirror = sidecar.running.runtime.paths["all"].shadow
    assert mirror is not None
    await asyncio.wait_for(mirror.wait_idle(), 10)
    # Binomial(100, 0.5): outside 20..80 with a probability under 1e-9.
    assert 20 <= len(candidate.hits_for("/infer")) <= 80


# -- 19: the request id an upstream accepts --------------------------------------------


async def test_an_upstream_can_get_its_request_id_as_a_uuid(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    config = base_config(fake_model.url)
    config["upstreams"]["model"]["request_id"] = {"format": "uuid"}
    sidecar = await start_sidecar(config)
    for _ in range(2):
        async with sidecar.session.get(
            sidecar.url + "/v1/models", headers={"X-Request-ID": "req-42"}
        ) as resp:
            assert resp.headers["X-Request-ID"] == "req-42"  # the client's, kept
    sent = [h.headers["x-request-id"][0] for h in fake_model.hits_for("/v1/models")]
    assert str(uuid.UUID(sent[0])) == sent[0]
    assert sent[0] == sent[1]  # the same id stands for the same client id
    config["upstreams"]["model"]["request_id"] = {"header": None}
    quiet = await start_sidecar(config)
    async with quiet.session.get(quiet.url + "/none"):
        pass
    assert "x-request-id" not in fake_model.hits_for("/none")[0].headers


# -- 21: limits clients cannot get around ----------------------------------------------


async def test_a_flood_of_bad_keys_is_rate_limited(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    config = base_config(fake_model.url)
    config["auth"] = {"enabled": True, "api_keys": [{"name": "a", "digest": hash_key("k")}]}
    config["rate_limit"] = {"enabled": True, "global": {"rate": "1/h", "burst": 5}}
    sidecar = await start_sidecar(config)
    statuses = []
    for _ in range(8):
        async with sidecar.session.get(sidecar.url + "/x", headers={"X-API-Key": "bad"}) as r:
            statuses.append(r.status)
    assert statuses == [401] * 5 + [429] * 3


async def test_a_slow_uploader_holds_no_slot_in_flight(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    config = base_config(fake_model.url)
    config["routes"][0]["max_in_flight"] = 1
    sidecar = await start_sidecar(config)
    _, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x")
    await writer.drain()
    try:
        runtime = sidecar.running.runtime
        for _ in range(200):  # bounded: until the trickling request waits for its body
            if runtime.active:
                break
            await asyncio.sleep(0.01)
        assert runtime.active == 1
        for _ in range(3):
            async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
                assert resp.status == 200
    finally:
        writer.close()


async def test_duplicate_json_keys_are_refused_where_validation_is_on(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    config = base_config(fake_model.url)
    config["routes"][0]["validate"] = {"json": True}
    sidecar = await start_sidecar(config)
    for body in (b'{"a": 1, "a": 2}', b'{"x": {"k": 1, "k": 1}}', b'[{"b": 0, "b": 0}]'):
        async with sidecar.session.post(sidecar.url + "/infer", data=body) as resp:
            assert resp.status == 400, body
            assert (await resp.json())["error"]["message"] == (
                "the body repeats a key in one object: models may read either copy"
            )
    for body in (b'{"a": 1, "b": {"a": 2}}', b'{"a": "\\"a\\": 1"}', b'[{"a": 1}, {"a": 2}]'):
        async with sidecar.session.post(sidecar.url + "/infer", data=body) as resp:
            assert resp.status == 200, body
    assert len(fake_model.hits_for("/infer")) == 3


# -- 22: what reaches whom -------------------------------------------------------------


async def test_a_token_named_like_a_key_is_not_that_key(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    import jwt

    secret = "s" * 40
    config = base_config(fake_model.url)
    config["auth"] = {
        "enabled": True,
        "api_keys": [{"name": "billing", "digest": hash_key("billing-key"), "routes": ["all"]}],
        "jwt": {"algorithms": ["HS256"], "secret": secret},
    }
    config["rate_limit"] = {"enabled": True, "per_principal": {"rate": "1/h", "burst": 1}}
    sink = ListSink()
    sidecar = await start_sidecar(config, log_sinks={"access": sink})
    token = jwt.encode({"sub": "billing", "exp": 2_000_000_000}, secret, algorithm="HS256")
    async with sidecar.session.get(
        sidecar.url + "/x", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 200
    async with sidecar.session.get(sidecar.url + "/x", headers={"X-API-Key": "billing-key"}) as r:
        assert r.status == 200  # its own bucket: the token's request took nothing from it
    records = await flushed(sidecar, sink, 2)
    assert [r["principal"] for r in records] == ["jwt:billing", "billing"]


async def test_a_502_names_no_class_and_no_address(start_sidecar: StartSidecar) -> None:
    port = closed_port()
    sidecar = await start_sidecar(base_config(f"http://{LOOPBACK}:{port}"), wait_ready=False)
    async with sidecar.session.get(sidecar.url + "/x") as resp:
        assert resp.status == 502
        body = await resp.text()
    assert orjson.loads(body)["error"]["message"] == (
        "cannot connect to upstream 'model': connection refused"
    )
    assert str(port) not in body
    assert "Error" not in body


async def test_an_upstream_that_never_accepts_fails_the_connect_in_its_timeout(
    start_sidecar: StartSidecar,
) -> None:
    """A connect that outlasts ``connect_timeout`` is a connect failure (502), named
    with the wait; not a timeout of the request, whose deadline is far."""
    with unanswered_port() as port:
        config = base_config(f"http://{LOOPBACK}:{port}")
        config["upstreams"]["model"]["connect_timeout"] = "200ms"
        sidecar = await start_sidecar(config, wait_ready=False)
        async with sidecar.session.get(sidecar.url + "/x") as resp:
            assert resp.status == 502  # the route's 5 s would have been a 504
            error = orjson.loads(await resp.read())["error"]
    assert error["type"] == "upstream_error"
    assert error["message"] == "cannot connect to upstream 'model': no connection within 0.2s"


async def test_a_request_whose_deadline_ends_while_connecting_is_a_timeout(
    start_sidecar: StartSidecar,
) -> None:
    """When the attempt's deadline (here the route's) comes before the connect
    timeout, the wait for a connection is part of the wait for the answer: a 504, not
    a 502 saying the connection failed."""
    with unanswered_port() as port:
        config = base_config(f"http://{LOOPBACK}:{port}")
        config["upstreams"]["model"]["connect_timeout"] = "10s"
        config["routes"][0]["timeout"] = "300ms"
        sidecar = await start_sidecar(config, wait_ready=False)
        async with sidecar.session.get(sidecar.url + "/x") as resp:
            assert resp.status == 504
            error = orjson.loads(await resp.read())["error"]
    assert error["type"] == "upstream_timeout"
    assert "0.3s" in error["message"], error["message"]


# -- 15: a schema violation costs a bounded amount, and bounded metric series --------


async def test_a_huge_schema_violation_lists_twenty_paths_and_client_keys_make_no_series(
    fake_model: FakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    schema = {
        "type": "object",
        "properties": {"data": {"type": "array", "items": {"type": "number"}}},
        "additionalProperties": {"type": "object", "properties": {"v": {"type": "number"}}},
    }
    (tmp_path / "schema.json").write_bytes(orjson.dumps(schema))
    config = base_config(fake_model.url)
    config["routes"][0]["validate"] = {"schema": str(tmp_path / "schema.json")}
    sidecar = await start_sidecar(config)
    # ~600 KB: every item fails, and a thousand keys of the client's choosing fail too.
    body = {"data": ["not a number"] * 50_000}
    body.update({f"client-key-{i}": {"v": "x"} for i in range(1000)})
    async with sidecar.session.post(sidecar.url + "/infer", json=body) as resp:
        assert resp.status == 422
        error = (await resp.json())["error"]
    assert len(error["details"]) == 20
    assert error["message"].endswith("(and more)")
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    fields = re.findall(r'sidecar_schema_violations_total\{[^}]*field="([^"]*)"', text)
    assert set(fields) <= {"data[*]", "{*}.v"}, fields
    assert fake_model.hits == []


async def test_a_reused_client_id_is_kept_and_every_log_line_has_a_unique_one(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sink = ListSink()
    sidecar = await start_sidecar(base_config(fake_model.url), log_sinks={"access": sink})
    for _ in range(3):
        async with sidecar.session.get(
            sidecar.url + "/x", headers={"X-Request-ID": "same-id"}
        ) as resp:
            assert resp.headers["X-Request-ID"] == "same-id"  # theirs, for correlation
    records = await flushed(sidecar, sink, 3)
    assert {r["request_id"] for r in records} == {"same-id"}
    assert len({r["sidecar_id"] for r in records}) == 3  # ours, unique
    assert [h.headers["x-request-id"] for h in fake_model.hits_for("/x")] == [["same-id"]] * 3
