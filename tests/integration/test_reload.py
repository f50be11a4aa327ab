"""Hot reload and rollback: no request lost, a broken config changes nothing."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from sidecar.upstream.breaker import CLOSED
from tests.conftest import (
    LOOPBACK,
    FakeClock,
    FakeModel,
    MakeFakeModel,
    StartSidecar,
    base_config,
    clients_that_sent,
    start_sidecar_process,
)
from tests.integration.test_endpoints import metric_value
from tests.integration.test_http_layer import status_and_body
from tests.integration.test_resilience import (
    metrics_text,
    open_the_secondarys_circuit,
    status_handler,
)


def named(name: str) -> Any:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"model": name})

    return answer


async def test_reload_under_load_switches_models_without_a_failed_request(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    old_model, new_model = await make_fake_model(), await make_fake_model()
    old_model.on("/infer", named("v1"))
    new_model.on("/infer", named("v2"))
    sidecar = await start_sidecar(base_config(old_model.url))
    config_path = sidecar.running.live.config_path
    old_sha256 = sidecar.running.live.current.loaded.sha256
    seen: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()
    progress = asyncio.Condition()

    async def answered(count: int) -> None:
        async with progress:
            await progress.wait_for(lambda: len(seen) >= count)

    async def steady_load() -> None:
        while not stop.is_set():
            try:
                async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
                    if resp.status != 200:
                        failures.append(str(resp.status))
                    else:
                        seen.append((await resp.json())["model"])
                        async with progress:
                            progress.notify_all()
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    loaders = [asyncio.create_task(steady_load()) for _ in range(8)]
    await answered(200)
    config_path.write_text(yaml.safe_dump(base_config(new_model.url)))
    async with sidecar.session.post(sidecar.admin_url + "/-/reload") as resp:
        assert resp.status == 200
        result = await resp.json()
    await answered(len(seen) + 200)
    stop.set()
    await asyncio.gather(*loaders)

    assert failures == []
    assert result["result"] == "ok"
    assert seen[0] == "v1"
    assert seen[-1] == "v2"
    switch = seen.index("v2")
    assert "v1" not in seen[switch + 20 :]  # after the swap, only stragglers of the old
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "sidecar_config_reloads_total", result="ok") == 1
    assert metric_value(text, "sidecar_config_info", sha256=result["sha256"]) == 1
    assert f'sha256="{old_sha256}"' not in text  # removed, not kept at 0 for good


async def test_a_broken_config_on_reload_keeps_the_old_one_serving(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    model = await make_fake_model()
    model.on("/infer", named("v1"))
    sidecar = await start_sidecar(base_config(model.url))
    before = sidecar.running.runtime
    config_path = sidecar.running.live.config_path
    broken = base_config(model.url)
    broken["routes"][0]["timout"] = "5s"
    config_path.write_text(yaml.safe_dump(broken))
    async with sidecar.session.post(sidecar.admin_url + "/-/reload") as resp:
        assert resp.status == 400
        result = await resp.json()
    assert result["result"] == "invalid"
    assert result["errors"] == ["routes[0].timout: unknown key"]
    assert sidecar.running.runtime is before
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert (await resp.json())["model"] == "v1"
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "sidecar_config_reloads_total", result="invalid") == 1


async def test_rollback_is_a_reload_back_to_the_previous_model(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    v1, v2 = await make_fake_model(), await make_fake_model()
    v1.on("/infer", named("v1"))
    v2.on("/infer", named("v2"))
    sidecar = await start_sidecar(base_config(v1.url))
    path = sidecar.running.live.config_path
    answers = []
    for url in (v2.url, v1.url):  # roll out v2, then roll back to v1
        path.write_text(yaml.safe_dump(base_config(url)))
        assert (await sidecar.running.reload())["result"] == "ok"
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            answers.append((await resp.json())["model"])
    assert answers == ["v2", "v1"]


async def test_sighup_reloads_a_running_process(
    make_fake_model: MakeFakeModel, tmp_path: Path
) -> None:
    v1, v2 = await make_fake_model(), await make_fake_model()
    v1.on("/infer", named("v1"))
    v2.on("/infer", named("v2"))
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(base_config(v1.url)))
    process, port, _ = await start_sidecar_process(path)
    try:
        path.write_text(yaml.safe_dump(base_config(v2.url)))
        process.send_signal(signal.SIGHUP)
        assert process.stdout is not None
        while True:
            record = orjson.loads(await asyncio.wait_for(process.stdout.readline(), 30))
            if record["event"] == "config_reloaded":
                break
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://{LOOPBACK}:{port}/infer", data=b"{}") as resp,
        ):
            assert (await resp.json())["model"] == "v2"
    finally:
        process.terminate()
        await process.wait()


async def test_a_request_that_never_ends_does_not_keep_old_runtimes_probing(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """Each reload retires a runtime; one whose request never finishes its body stops
    its probes at once and is stopped after the drain time, not kept for good."""
    model = await make_fake_model()
    config = base_config(model.url)
    config["server"]["drain_timeout"] = "300ms"
    sidecar = await start_sidecar(config)
    _, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    # A body that never comes: this request pins the runtime it arrived on.
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
    await writer.drain()
    try:
        first = sidecar.running.runtime
        for _ in range(100):  # bounded: until the request is inside the pipeline
            if first.active:
                break
            await asyncio.sleep(0.01)
        assert first.active == 1
        retired = []
        for _ in range(3):
            retired.append(sidecar.running.runtime)
            async with sidecar.session.post(sidecar.admin_url + "/-/reload") as resp:
                assert resp.status == 200
        await asyncio.sleep(0)  # the retiring tasks start
        for _ in range(100):  # bounded: the first one's drain time (300 ms) runs out
            if not first.upstreams.probing and first.upstreams._released:
                break
            await asyncio.sleep(0.01)
        for old in retired:
            assert not old.upstreams.probing, "a retired runtime still probes the model"
        assert first.upstreams._released  # stopped after the drain time, though busy
        assert sidecar.running.runtime.upstreams.probing
    finally:
        writer.close()


async def test_a_retired_runtime_stops_as_soon_as_its_last_request_ends(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """The old runtime keeps its pools while a request it took is in flight, and is
    stopped when that request ends, not when the (long) drain time runs out."""
    model = await make_fake_model()
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await request.read()
        await gate.wait()
        return web.json_response({"model": "old"})

    model.on("/held", held)
    config = base_config(model.url)
    config["server"]["drain_timeout"] = "60s"
    sidecar = await start_sidecar(config)
    first = sidecar.running.runtime
    in_flight = asyncio.create_task(sidecar.session.post(sidecar.url + "/held", data=b"{}"))
    try:
        for _ in range(200):  # bounded: until the request is inside the pipeline
            if first.active:
                break
            await asyncio.sleep(0.01)
        assert first.active == 1
        async with sidecar.session.post(sidecar.admin_url + "/-/reload") as resp:
            assert resp.status == 200
        assert sidecar.running.runtime is not first
        for _ in range(5):  # the retirement starts and waits
            await asyncio.sleep(0.01)
        assert not first.upstreams._released, "stopped while its request was in flight"
        gate.set()
        async with await in_flight as resp:
            assert resp.status == 200
            assert await resp.json() == {"model": "old"}
        for _ in range(200):  # bounded: 2 s, where the drain time is 60 s
            if first.upstreams._released:
                break
            await asyncio.sleep(0.01)
        assert first.upstreams._released, "the retired runtime waited for its drain time"
        assert first.active == 0
    finally:
        gate.set()
        if not in_flight.done():
            in_flight.cancel()


async def test_a_retired_runtime_stops_once_the_clients_of_its_requests_have_left(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """A request that ends because its client left is no longer in flight: the
    retired runtime is stopped when the last such client leaves, not before and not
    at the end of the drain time."""
    model = await make_fake_model()
    never = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await request.read()
        await never.wait()
        return web.json_response({})

    model.on("/held", held)
    config = base_config(model.url)
    config["server"]["drain_timeout"] = "60s"
    sidecar = await start_sidecar(config)
    first = sidecar.running.runtime
    request = b"POST /held HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    main_port = sidecar.running.main_port
    clients = [writer for _, writer in await clients_that_sent(main_port, request, 2)]
    try:
        for _ in range(200):  # bounded: until both requests are inside the pipeline
            if first.active == 2:
                break
            await asyncio.sleep(0.01)
        assert first.active == 2
        async with sidecar.session.post(sidecar.admin_url + "/-/reload") as resp:
            assert resp.status == 200
        clients[0].close()
        for _ in range(200):  # bounded: the first client's request is cancelled
            if first.active == 1:
                break
            await asyncio.sleep(0.01)
        assert first.active == 1
        await asyncio.sleep(0.05)
        assert not first.upstreams._released, "stopped while a request was in flight"
        clients[1].close()
        for _ in range(200):  # bounded: 2 s, where the drain time is 60 s
            if first.upstreams._released:
                break
            await asyncio.sleep(0.01)
        assert first.upstreams._released, "the retired runtime waited for its drain time"
    finally:
        never.set()
        for writer in clients:
            writer.close()


async def test_an_upload_that_outlasts_a_reloads_drain_time_gets_a_clear_error_of_ours(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """A slow upload arrives under one config; a reload points the route elsewhere
    and the old config's drain time runs out before the body is complete, so its
    upstream connections are closed. The client got 502 upstream_error "upstream
    'model' closed the connection before answering" (the model had closed nothing),
    the failure counted against the breaker, and a fallback made up an answer. Now:
    503 ``reloaded`` in the route's protocol shape, saying what happened."""
    old_model, new_model = await make_fake_model(), await make_fake_model()
    old_model.on("/v2/models/m/infer", named("v1"))
    new_model.on("/v2/models/m/infer", named("v2"))
    config = base_config(old_model.url)
    config["server"]["drain_timeout"] = "0s"
    config["routes"][0].update(
        protocol="v2",
        fallback={"chain": [{"static": {"name": "made-up", "status": 200, "body": {}}}]},
    )
    sidecar = await start_sidecar(config)
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    body = b'{"inputs": []}'
    try:
        writer.write(
            b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nX-Request-ID: slow-1\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        # The sidecar asks for the body once the request is in its pipeline, at the
        # body stage: the request belongs to the runtime in service now.
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(body[:5])
        await writer.drain()
        config["upstreams"]["model"]["url"] = new_model.url
        sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
        assert (await sidecar.running.reload())["result"] == "ok"
        [retiring] = [t for t in asyncio.all_tasks() if t.get_name() == "retire-runtime"]
        await asyncio.wait_for(retiring, 10)  # drain time over: the old config stopped
        writer.write(body[5:])
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nX-Request-ID: slow-1\r\n" in head
        assert b"X-Sidecar-Fallback" not in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        error = orjson.loads(await asyncio.wait_for(reader.readexactly(length), 10))
    finally:
        writer.close()
    assert error == {
        "error": "the sidecar's config was reloaded during this request, which outlasted "
        "the old config's drain time (server.drain_timeout): it was not sent on to "
        "upstream 'model'; send it again",
        "type": "reloaded",
        "request_id": "slow-1",
    }
    assert old_model.hits_for("/v2/models/m/infer") == []
    assert new_model.hits_for("/v2/models/m/infer") == []
    async with sidecar.session.post(
        sidecar.url + "/v2/models/m/infer", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert await resp.json() == {"model": "v2"}  # sent again, it is answered


async def test_a_retry_that_outlasts_a_reloads_drain_time_does_not_say_it_was_never_sent(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """The model answers 503 with Retry-After; while the sidecar waits to retry, a
    reload retires the config and its drain time runs out, so the retry finds the
    old config's pool closed. The 503 ``reloaded`` said "it was not sent on to
    upstream 'model'", which the model had answered: it says the retry was not."""
    first = asyncio.Event()

    async def busy_once(request: web.Request) -> web.Response:
        if first.is_set():
            return web.json_response({"ok": True})
        first.set()
        return web.json_response({}, status=503, headers={"Retry-After": "1"})

    fake_model.on("/infer", busy_once)
    config = base_config(fake_model.url)
    config["server"]["drain_timeout"] = "0s"
    config["upstreams"]["model"]["breaker"] = {"enabled": False}
    config["routes"][0].update(timeout="10s", retryable=True, retry={"attempts": 2})
    sidecar = await start_sidecar(config)
    request = asyncio.ensure_future(sidecar.session.post(sidecar.url + "/infer", data=b"{}"))
    try:
        await asyncio.wait_for(first.wait(), 10)
        config["upstreams"]["model"]["max_connections"] = 7  # another pool: the old one closes
        sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
        assert (await sidecar.running.reload())["result"] == "ok"
        [retiring] = [t for t in asyncio.all_tasks() if t.get_name() == "retire-runtime"]
        await asyncio.wait_for(retiring, 10)
        resp = await asyncio.wait_for(request, 10)
        async with resp:
            assert resp.status == 503
            error = (await resp.json())["error"]
    finally:
        request.cancel()
    assert error["type"] == "reloaded"
    assert "not sent on" not in error["message"]
    assert error["message"] == (
        "the sidecar's config was reloaded during this request, which outlasted the old "
        "config's drain time (server.drain_timeout): upstream 'model' was tried 1 time(s) "
        "without an answer, and the retry was not sent; send it again"
    )
    assert len(fake_model.hits_for("/infer")) == 1


async def test_a_retired_runtimes_breaker_does_not_show_the_circuit_open(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A request from before a reload fails after it and opens the retired runtime's
    breaker: sidecar_circuit_state said open (2) for good, while the breaker in
    service was closed and the model answered. (The reload changes the breaker's
    settings, so the breaker in service is a new one, not the old one carried on.)"""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow_failure(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({}, status=503)

    fake_model.on("/slow", slow_failure)
    config = base_config(fake_model.url)
    config["upstreams"]["model"]["breaker"] = {"failures": 1, "reset_timeout": "1h"}
    sidecar = await start_sidecar(config)
    pending = asyncio.create_task(sidecar.session.post(sidecar.url + "/slow", data=b"{}"))
    await asyncio.wait_for(arrived.wait(), 10)
    retired = sidecar.running.runtime.guards["model"].breaker
    config["upstreams"]["model"]["breaker"]["reset_timeout"] = "2h"
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    release.set()
    response = await asyncio.wait_for(pending, 10)
    assert response.status == 503  # the model's answer, after the swap
    response.release()
    breaker = sidecar.running.runtime.guards["model"].breaker
    assert breaker is not None
    assert breaker is not retired
    assert retired is not None
    assert retired.state == "open"  # the straggler opened it
    assert breaker.state == "closed"
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "sidecar_circuit_state", upstream="model") == 0


async def test_a_reloads_new_breaker_shows_only_once_in_service(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A reload builds its runtime, then waits for its probes before the swap: its new
    breaker (the settings changed) set the gauge to closed at once, while the breaker
    in service, open, still decided every request."""
    probed, release = asyncio.Event(), asyncio.Event()

    async def slow_health(request: web.Request) -> web.Response:
        probed.set()
        await release.wait()
        return web.json_response({})

    fake_model.on("/infer", status_handler(503))
    fake_model.on("/slow-health", slow_health)
    config = base_config(fake_model.url)
    config["upstreams"]["model"]["breaker"] = {"failures": 1, "reset_timeout": "1h"}
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 503
    assert metric_value(await metrics_text(sidecar), "sidecar_circuit_state", upstream="model") == 2
    config["upstreams"]["model"]["breaker"]["reset_timeout"] = "2h"
    config["upstreams"]["model"]["health"] = {"path": "/slow-health", "interval": "1h"}
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    reload = asyncio.create_task(sidecar.running.reload())
    await asyncio.wait_for(probed.wait(), 10)  # built, and waiting for its probe
    assert metric_value(await metrics_text(sidecar), "sidecar_circuit_state", upstream="model") == 2
    release.set()
    assert (await asyncio.wait_for(reload, 10))["result"] == "ok"
    assert metric_value(await metrics_text(sidecar), "sidecar_circuit_state", upstream="model") == 0


async def test_an_open_circuit_stays_open_across_a_reload_that_leaves_its_breaker_alone(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """Each reload made fresh, closed breakers: a model that was down got traffic
    again after any reload. Unchanged URL and breaker settings: the breaker (its state
    and its counts) carries on; a changed URL or breaker: a fresh one, closed."""
    first, second = await make_fake_model(), await make_fake_model()
    answers = {"status": 503}

    async def model(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({}, status=answers["status"])

    first.on("/infer", model)
    second.on("/infer", model)
    config = base_config(first.url)
    config["upstreams"]["model"]["breaker"] = {"failures": 2, "reset_timeout": "1h"}
    sidecar = await start_sidecar(config)
    reloads = iter(range(10, 20))

    async def reload(**upstream: Any) -> None:
        config["routes"][0]["timeout"] = f"{next(reloads)}s"  # a change elsewhere
        config["upstreams"]["model"].update(upstream)
        sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
        assert (await sidecar.running.reload())["result"] == "ok"

    async def error_type() -> str | None:
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            body = await resp.json()
            return body["error"]["type"] if "error" in body else None

    async def circuit_state() -> float | None:
        async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
            return metric_value(await resp.text(), "sidecar_circuit_state", upstream="model")

    async def open_the_circuit() -> None:
        assert await error_type() is None  # the model's own 503: one failure of two
        await reload()
        assert await error_type() is None  # the second failure, counted on: open
        await reload()
        hits = len(first.hits_for("/infer")) + len(second.hits_for("/infer"))
        assert await error_type() == "circuit_open"
        assert len(first.hits_for("/infer")) + len(second.hits_for("/infer")) == hits
        assert await circuit_state() == 2

    await open_the_circuit()
    await reload(breaker={"failures": 2, "reset_timeout": "2h"})  # a fresh breaker
    assert await circuit_state() == 0
    answers["status"] = 200
    assert await error_type() is None  # the model is called again
    assert len(first.hits_for("/infer")) == 3
    answers["status"] = 503
    await open_the_circuit()
    await reload(url=second.url)  # another model server: a fresh breaker
    assert await circuit_state() == 0
    answers["status"] = 200
    assert await error_type() is None
    assert len(second.hits_for("/infer")) == 1


async def test_the_in_flight_cap_holds_across_a_reload(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()
    held = []

    async def slow(request: web.Request) -> web.Response:
        held.append(1)
        if len(held) == 2:
            arrived.set()
        await release.wait()
        return web.json_response({"done": True})

    fake_model.on("/slow", slow)
    config = base_config(fake_model.url)
    config["server"]["max_in_flight"] = 2
    sidecar = await start_sidecar(config)
    pending = [
        asyncio.create_task(sidecar.session.post(sidecar.url + "/slow", data=b"{}"))
        for _ in range(2)
    ]
    try:
        await asyncio.wait_for(arrived.wait(), 10)
        config["routes"][0]["timeout"] = "7s"
        sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
        assert (await sidecar.running.reload())["result"] == "ok"
        async with sidecar.session.post(sidecar.url + "/x", data=b"{}") as resp:
            assert resp.status == 503  # a third request while two are out: shed
    finally:
        release.set()
        for response in await asyncio.gather(*pending):
            response.release()


async def test_a_reload_does_not_refill_the_rate_limit_buckets(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Each runtime made its limiter with full buckets: every reload (here one that
    changes a route's timeout only) handed every client its whole burst again."""
    config = base_config(
        fake_model.url, rate_limit={"enabled": True, "global": {"rate": "1/h", "burst": 3}}
    )
    sidecar = await start_sidecar(config)
    statuses = []
    for index in range(6):
        if index == 4:
            config["routes"][0]["timeout"] = "7s"
            sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
            assert (await sidecar.running.reload())["result"] == "ok"
        async with sidecar.session.get(sidecar.url + "/x") as resp:
            statuses.append(resp.status)
    assert statuses == [200, 200, 200, 429, 429, 429]


async def test_a_reload_that_removes_an_upstream_drops_its_circuit_and_readiness(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    main, other = await make_fake_model(), await make_fake_model()
    other.on("/other", status_handler(503))
    config = base_config(main.url)
    config["upstreams"]["other"] = {
        "url": other.url,
        "breaker": {"failures": 1, "reset_timeout": "1h"},
    }
    config["routes"].insert(0, {"name": "other", "path_prefix": "/other", "upstream": "other"})
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/other", data=b"{}") as resp:
        assert resp.status == 503
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_circuit_state", upstream="other") == 2
    del config["upstreams"]["other"]
    config["routes"].pop(0)
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    text = await metrics_text(sidecar)
    assert 'upstream="other"' not in "\n".join(
        line
        for line in text.splitlines()
        if line.startswith(("sidecar_circuit_state", "sidecar_upstream_ready"))
    )


def _cached_route_config(url: str) -> dict[str, Any]:
    """A route whose fallback asks its cache (room for two of the answers below), then
    answers a static default; no breaker, so a 503 of the model is a fallback each time."""
    config = base_config(url)
    config["upstreams"]["model"]["breaker"] = {"enabled": False}
    config["routes"][0]["fallback"] = {
        "chain": [
            {"cache": {"ttl": "1h", "max_bytes": "40B"}},
            {"static": {"name": "default-answer", "body": {"label": -1}}},
        ]
    }
    return config


def _echo_unless_down(state: dict[str, bool]) -> Any:
    async def answer(request: web.Request) -> web.Response:
        payload = await request.json()
        if state["up"]:
            return web.json_response({"echo": payload})  # 18 bytes for {"n": 0}
        return web.json_response({"error": "down"}, status=503)

    return answer


async def test_a_reload_that_leaves_a_route_alone_keeps_its_fallback_cache(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Each reload built each route a new fallback chain, and with it an empty cache:
    a model down at a reload had lost every answer the cache could have given. With
    the route's protocol, its cache settings and its model unchanged, the cache
    carries on, with the bytes it holds counted in its budget: the answer stored
    after the reload evicts the oldest, as it would have without the reload."""
    state = {"up": True}
    fake_model.on("/infer", _echo_unless_down(state))
    config = _cached_route_config(fake_model.url)
    sidecar = await start_sidecar(config)

    async def ask(n: int) -> tuple[str | None, Any]:
        async with sidecar.session.post(sidecar.url + "/infer", json={"n": n}) as resp:
            assert resp.status == 200
            return resp.headers.get("X-Sidecar-Fallback"), await resp.json()

    assert await ask(0) == (None, {"echo": {"n": 0}})
    assert await ask(1) == (None, {"echo": {"n": 1}})
    config["routes"][0]["timeout"] = "7s"  # a change elsewhere in the route
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    assert await ask(2) == (None, {"echo": {"n": 2}})  # 54 bytes in 40: n=0 goes
    state["up"] = False
    assert await ask(1) == ("cache", {"echo": {"n": 1}})
    assert await ask(2) == ("cache", {"echo": {"n": 2}})
    assert await ask(0) == ("default-answer", {"label": -1})
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_dropped_total", buffer="fallback_cache", route="all") == 1


@pytest.mark.parametrize(
    "change", ["cache ttl", "model url", "model headers", "protocol", "max_parse_bytes"]
)
async def test_a_reload_that_changes_what_a_cached_answer_means_empties_the_cache(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar, change: str
) -> None:
    """A cached answer is carried over a reload only when it would still be the
    answer: other cache settings start a new cache, and so does another model (another
    URL, or other headers the sidecar sends it) or another protocol or
    max_parse_bytes (another key)."""
    state = {"up": True}
    first, second = await make_fake_model(), await make_fake_model()
    first.on("/infer", _echo_unless_down(state))
    second.on("/infer", _echo_unless_down(state))
    config = _cached_route_config(first.url)
    sidecar = await start_sidecar(config)
    async with sidecar.session.post(sidecar.url + "/infer", json={"n": 0}) as resp:
        assert await resp.json() == {"echo": {"n": 0}}
    if change == "cache ttl":
        config["routes"][0]["fallback"]["chain"][0]["cache"]["ttl"] = "2h"
    elif change == "model url":
        config["upstreams"]["model"]["url"] = second.url
    elif change == "model headers":
        config["upstreams"]["model"]["headers"] = {"X-Model-Version": "2"}
    elif change == "max_parse_bytes":
        config["routes"][0]["fallback"]["max_parse_bytes"] = "4B"
    else:
        config["routes"][0]["protocol"] = "v2"
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    state["up"] = False
    async with sidecar.session.post(sidecar.url + "/infer", json={"n": 0}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
        assert await resp.json() == {"label": -1}


async def test_a_secondary_step_refused_by_a_reload_does_not_close_the_secondarys_circuit(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """The secondary model's circuit is open and its reset timeout over; a request from
    before a reload that changed the secondary's pool (not its breaker, which carries
    on) falls back after the old config's drain time, so the secondary step finds its
    pool closed: a reload's refusal, which must count for neither side. It was taken
    for the secondary answering: its half-open circuit closed, with the model never
    asked."""
    clock = FakeClock()
    primary, simple = await make_fake_model(), await make_fake_model()
    arrived, release = asyncio.Event(), asyncio.Event()
    slow = {"on": False}

    async def failing(request: web.Request) -> web.Response:
        if slow["on"]:
            arrived.set()
            await release.wait()
        return web.json_response({}, status=503)

    primary.on("/infer", failing)
    simple.on("/infer", status_handler(503))
    config = base_config(primary.url)
    config["server"]["drain_timeout"] = "0s"
    config["upstreams"]["model"]["breaker"] = {"enabled": False}
    config["upstreams"]["simple"] = {
        "url": simple.url,
        "breaker": {"failures": 1, "reset_timeout": "10s"},
    }
    config["routes"][0]["fallback"] = {
        "chain": [
            {"upstream": {"name": "simple"}},
            {"static": {"name": "default-answer", "status": 200, "body": {}}},
        ]
    }
    sidecar = await start_sidecar(config, clock=clock)
    breaker = await open_the_secondarys_circuit(sidecar)
    clock.advance(11)  # the next call to the secondary probes it
    slow["on"] = True
    request = asyncio.ensure_future(sidecar.session.post(sidecar.url + "/infer", json={"x": 1}))
    try:
        await asyncio.wait_for(arrived.wait(), 10)
        config["upstreams"]["simple"]["max_connections"] = 7  # another pool; same breaker
        sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
        assert (await sidecar.running.reload())["result"] == "ok"
        assert sidecar.running.runtime.guards["simple"].breaker is breaker
        [retiring] = [t for t in asyncio.all_tasks() if t.get_name() == "retire-runtime"]
        await asyncio.wait_for(retiring, 10)  # the old config's pools are closed
        release.set()
        resp = await asyncio.wait_for(request, 10)
        async with resp:
            assert resp.headers["X-Sidecar-Fallback"] == "default-answer"
    finally:
        release.set()
        request.cancel()
    assert len(simple.hits_for("/infer")) == 1  # not asked since it failed
    assert breaker.state != CLOSED
    text = await metrics_text(sidecar)
    assert metric_value(text, "sidecar_circuit_state", upstream="simple") != 0


async def _trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
) -> bytes:
    """A 30-byte body at 10 bytes a second after ``head``, until the sidecar answers
    and closes."""
    answer = asyncio.ensure_future(asyncio.wait_for(reader.read(), 10))
    writer.write(head)
    for _ in range(30):
        await asyncio.wait([answer], timeout=0.1)
        if answer.done():
            break
        writer.write(b"b")
    return await answer


async def test_a_reload_changes_the_http_layers_limits(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """server.body_min_rate (and the HTTP layer's other server.* limits) were read
    once at start: a reload that set it answered ok, and a body trickled at 10 B/s
    still went on to the model. Now it applies from the swap, on new connections and
    on the next request of one kept alive from before."""
    config = base_config(fake_model.url)
    config["server"].update(body_timeout="1s", body_min_rate="0B/s")
    sidecar = await start_sidecar(config)
    port = sidecar.running.main_port
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n"
    closing = b"\r\nConnection: close\r\n\r\n"
    kept_reader, kept = await asyncio.open_connection(LOOPBACK, port)
    fresh_reader, fresh = await asyncio.open_connection(LOOPBACK, port)
    try:
        kept.write(head + b"a" * 30)  # answered, and the connection kept alive
        first = await asyncio.wait_for(kept_reader.readuntil(b"\r\n\r\n"), 10)
        length = int(first.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(kept_reader.readexactly(length), 10)
        config["server"]["body_min_rate"] = "1KiB/s"
        sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
        assert (await sidecar.running.reload())["result"] == "ok"
        for reader, writer in ((fresh_reader, fresh), (kept_reader, kept)):
            raw = await _trickle(reader, writer, head.replace(b"\r\n\r\n", closing))
            status, body = status_and_body(raw)
            assert status == 408
            assert "server.body_min_rate" in orjson.loads(body)["error"]["message"]
    finally:
        kept.close()
        fresh.close()
    assert [hit.body for hit in fake_model.hits_for("/x")] == [b"a" * 30]
