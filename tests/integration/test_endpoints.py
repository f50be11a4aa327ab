"""The sidecar's own endpoints: never forwarded, readiness from a cached probe, metrics."""

from __future__ import annotations

import asyncio
import re

import orjson

from tests.conftest import FakeModel, StartSidecar, base_config, raw_request


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_own_endpoints_are_never_forwarded(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    for path in ("/livez", "/readyz"):
        async with sidecar.session.get(sidecar.url + path) as resp:
            assert resp.status == 200, path
            assert "X-Request-ID" in resp.headers
    for path in ("/livez", "/readyz", "/health", "/metrics"):
        async with sidecar.session.get(sidecar.admin_url + path) as resp:
            assert resp.status == 200, path
    assert fake_model.hits == []


async def test_with_an_admin_listener_model_metrics_stay_reachable(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.get(sidecar.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["X-Model"] == "fake"
    assert len(fake_model.hits_for("/metrics")) == 1


async def test_without_an_admin_listener_the_main_one_serves_health_and_metrics(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url, admin={"enabled": False}))
    assert sidecar.running.admin_port == 0
    async with sidecar.session.get(sidecar.url + "/metrics") as resp:
        assert resp.status == 200
        assert "sidecar_requests_total" in await resp.text()
    async with sidecar.session.get(sidecar.url + "/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["checks"]["upstream:model:ready"]["status"] == "pass"
    assert fake_model.hits == []


async def test_readyz_follows_the_cached_probe_without_calling_the_model(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    fake_model.health_status = 503
    sidecar = await start_sidecar(base_config(fake_model.url))
    runtime = sidecar.running.runtime
    for _ in range(20):
        async with sidecar.session.get(sidecar.url + "/readyz") as resp:
            assert resp.status == 503
            # The public listener tells clients nothing about upstreams or errors.
            assert await resp.json() == {"status": "not_ready"}
    async with sidecar.session.get(sidecar.admin_url + "/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "not_ready"
    assert body["reasons"] == ["upstream model: /v2/health/ready answered 503"]
    async with sidecar.session.get(sidecar.admin_url + "/health") as resp:
        assert resp.status == 503
        check = (await resp.json())["checks"]["upstream:model:ready"]
    assert check["status"] == "fail"
    assert check["last_success"] is None

    fake_model.health_status = 200
    await runtime.upstreams.probe_all()
    async with sidecar.session.get(sidecar.url + "/readyz") as resp:
        assert resp.status == 200
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "sidecar_upstream_ready", upstream="model") == 1.0


async def test_readyz_is_503_until_the_first_probe_finishes(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    fake_model.health_gate = asyncio.Event()
    config = base_config(fake_model.url)
    config["upstreams"]["model"]["health"]["timeout"] = "60s"  # the gate, not a timeout, decides
    sidecar = await start_sidecar(config, wait_ready=False)
    upstreams = sidecar.running.runtime.upstreams
    async with sidecar.session.get(sidecar.admin_url + "/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["reasons"][0].startswith("starting")
    fake_model.health_gate.set()
    await upstreams.first_pass_done.wait()
    async with sidecar.session.get(sidecar.url + "/readyz") as resp:
        assert resp.status == 200


async def test_metrics_count_scripted_traffic_exactly(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    config = base_config(fake_model.url)
    config["routes"] = [
        {"name": "infer", "path_prefix": "/infer", "methods": ["POST"], "upstream": "model"},
        {"name": "rest", "path_prefix": "/other", "upstream": "model"},
    ]
    sidecar = await start_sidecar(config)
    for _ in range(3):
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.status == 200
    async with sidecar.session.get(sidecar.url + "/infer") as resp:
        assert resp.status == 405
    for _ in range(2):
        async with sidecar.session.get(sidecar.url + "/other") as resp:
            assert resp.status == 200
    async with sidecar.session.get(sidecar.url + "/nowhere") as resp:
        assert resp.status == 404
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert (
        metric_value(text, "sidecar_requests_total", route="infer", status="200", outcome="ok") == 3
    )
    assert (
        metric_value(text, "sidecar_requests_total", route="rest", status="200", outcome="ok") == 2
    )
    assert (
        metric_value(text, "sidecar_requests_total", route="-", status="405", outcome="rejected")
        == 1
    )
    assert (
        metric_value(text, "sidecar_requests_total", route="-", status="404", outcome="rejected")
        == 1
    )
    assert metric_value(text, "sidecar_request_duration_seconds_count", route="infer") == 3
    assert metric_value(text, "sidecar_upstream_duration_seconds_count", upstream="model") == 5
    assert metric_value(text, "sidecar_in_flight_requests") == 0


async def test_admin_listener_answers_unknown_paths_with_json(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.get(sidecar.admin_url + "/nothing-here") as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error["type"] == "no_route"
    assert error["request_id"] == resp.headers["X-Request-ID"]


async def test_admin_listener_refuses_like_the_main_one(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """The admin listener runs the same HTTP server: a wrong method, a smuggling shape
    and a HEAD are handled as on the main listener, errors in the JSON shape."""
    sidecar = await start_sidecar(base_config(fake_model.url))
    async with sidecar.session.post(sidecar.admin_url + "/metrics", data=b"{}") as resp:
        assert resp.status == 405
        error = (await resp.json())["error"]
    assert error["type"] == "method_not_allowed"
    assert error["request_id"] == resp.headers["X-Request-ID"]
    assert resp.headers["Allow"] == "GET, HEAD"

    port = sidecar.running.admin_port
    smuggled = await raw_request(
        port,
        b"POST /-/reload HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    head, _, body = smuggled.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert orjson.loads(body)["error"]["type"] == "bad_request"

    answer = await raw_request(
        port, b"HEAD /livez HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nx-request-id: " in head.lower()
    assert body == b""
