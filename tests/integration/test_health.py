"""Deep health: models, canary, degraded fallback, internals; /readyz never calls the model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from sidecar.control.health import LoopLagMonitor
from sidecar.telemetry.metrics import Metrics
from tests.conftest import FakeClock, FakeModel, MakeFakeModel, StartSidecar, base_config
from tests.integration.test_observability import BlockingSink

GOLDEN = {
    "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}


def health_config(upstream: str, **health: Any) -> dict[str, Any]:
    config = base_config(upstream)
    config["upstreams"]["model"]["health"] = {
        "interval": "1h",
        "timeout": "2s",
        "models": ["iris"],
        **health,
    }
    return config


def model_state(fake: FakeModel) -> dict[str, Any]:
    state: dict[str, Any] = {"loaded": False, "label": 0}

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": state["loaded"]}, status=200 if state["loaded"] else 503)

    async def infer(request: web.Request) -> web.Response:
        return web.json_response({"outputs": [{"name": "label", "data": [state["label"]]}]})

    fake.on("/v2/models/iris/ready", ready)
    fake.on("/v2/models/iris/infer", infer)
    return state


async def readyz(sidecar: Any) -> tuple[int, dict[str, Any]]:
    """The admin listener's /readyz, with reasons; the public one must agree, bare."""
    async with sidecar.session.get(sidecar.url + "/readyz") as resp:
        public = resp.status, await resp.json()
    assert public[1] == {"status": "ready" if public[0] == 200 else "not_ready"}
    async with sidecar.session.get(sidecar.admin_url + "/readyz") as resp:
        assert resp.status == public[0]
        return resp.status, await resp.json()


async def test_a_model_not_loaded_makes_readyz_503_naming_it(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    state = model_state(fake_model)
    sidecar = await start_sidecar(health_config(fake_model.url))
    status, body = await readyz(sidecar)
    assert status == 503
    assert body["reasons"] == ["upstream model: /v2/models/iris/ready answered 503"]
    async with sidecar.session.get(sidecar.admin_url + "/health") as resp:
        checks = (await resp.json())["checks"]
    assert checks["upstream:model:ready"]["status"] == "pass"
    assert checks["upstream:model:model:iris"]["status"] == "fail"

    state["loaded"] = True
    await sidecar.running.runtime.upstreams.probe_all()
    status, body = await readyz(sidecar)
    assert (status, body) == (200, {"status": "ready"})


async def test_a_wrong_canary_answer_makes_readyz_503_with_the_reason(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    state = model_state(fake_model)
    state["loaded"] = True
    state["label"] = 2  # up, loaded, and answering wrong
    canary = {
        "path": "/v2/models/iris/infer",
        "body": GOLDEN,
        "expect": {"outputs": [{"name": "label", "data": [0]}]},
        "compare": {"protocol": "v2", "output": "label", "kind": "label"},
    }
    sidecar = await start_sidecar(health_config(fake_model.url, canary=canary))
    status, body = await readyz(sidecar)
    assert status == 503
    assert body["reasons"] == [
        "upstream model: canary answer differs from the expected one (label[0]: expected 0, got 2)"
    ]
    canary_hit = fake_model.hits_for("/v2/models/iris/infer")[0]
    assert orjson.loads(canary_hit.body) == GOLDEN

    state["label"] = 0
    await sidecar.running.runtime.upstreams.probe_all()
    assert (await readyz(sidecar))[0] == 200


async def test_many_readiness_probes_cause_no_upstream_calls(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    state = model_state(fake_model)
    state["loaded"] = True
    sidecar = await start_sidecar(health_config(fake_model.url))
    before = len(fake_model.hits)
    for _ in range(100):
        assert (await readyz(sidecar))[0] == 200
        async with sidecar.session.get(sidecar.admin_url + "/health") as resp:
            assert resp.status == 200
    assert len(fake_model.hits) == before


async def test_open_breaker_with_a_fallback_is_degraded_but_ready(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    async def down(request: web.Request) -> web.Response:
        return web.json_response({}, status=503)

    fake_model.on("/infer", down)
    for degraded_is_ready, expected in ((True, 200), (False, 503)):
        config = base_config(fake_model.url)
        config["upstreams"]["model"]["breaker"] = {"failures": 1, "reset_timeout": "1h"}
        config["routes"][0]["fallback"] = {"chain": [{"static": {"body": {}}}]}
        config["health"] = {"degraded_is_ready": degraded_is_ready}
        sidecar = await start_sidecar(config)
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.headers["X-Sidecar-Fallback"] == "static"
        status, body = await readyz(sidecar)
        assert status == expected
        assert body["reasons"] == [
            "upstream model: circuit open while its probes pass; "
            "route all answers from its fallback until a request closes it"
        ]
        if expected == 200:
            assert body["degraded"] is True


async def test_a_saturated_log_queue_is_degraded_or_not_ready_as_configured(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    for log_failure, expected in (("degraded", 200), ("not_ready", 503)):
        sink = BlockingSink()
        config = base_config(fake_model.url)
        config["logging"] = {"queue_size": 10}
        config["health"] = {"log_failure": log_failure}
        sidecar = await start_sidecar(config, log_sinks={"access": sink})
        try:
            for _ in range(30):
                async with sidecar.session.get(sidecar.url + "/x") as resp:
                    assert resp.status == 200
            status, body = await readyz(sidecar)
            assert status == expected, log_failure
            assert any(r.startswith("log writer access: queue") for r in body["reasons"])
        finally:
            sink.release.set()


async def test_event_loop_lag_is_measured_and_judged(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    monitor = LoopLagMonitor(Metrics(), interval=0.05)
    monitor.start()
    try:
        await asyncio.sleep(0.01)  # let the monitor start its sleep
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is what is measured
        for _ in range(100):  # bounded: until the monitor has woken once
            if monitor.lag > 0:
                break
            await asyncio.sleep(0.01)
        assert monitor.lag >= 0.2
    finally:
        await monitor.stop()

    sidecar = await start_sidecar(base_config(fake_model.url))
    lag = sidecar.running.runtime.loop_lag
    assert lag is not None
    await lag.stop()  # judge a fixed value, not a live one
    lag.lag = 0.9
    status, body = await readyz(sidecar)
    assert status == 503
    assert body["reasons"] == ["event loop lag 900 ms over 500 ms"]


async def test_an_open_breaker_never_takes_a_healthy_model_out_of_service(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """The deadlock: a route without a fallback, its model restarted. Readiness follows
    the model's probes, not the circuit; a passing probe half-opens the circuit once
    its reset timeout is over, and the next request closes it."""
    state = {"up": False}

    async def restarting(request: web.Request) -> web.Response:
        return web.json_response({"ok": state["up"]}, status=200 if state["up"] else 503)

    fake_model.on("/infer", restarting)
    config = base_config(fake_model.url)
    config["upstreams"]["model"]["breaker"] = {"failures": 2, "reset_timeout": "10s"}
    clock = FakeClock()
    sidecar = await start_sidecar(config, clock=clock)
    for _ in range(2):
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.status == 503
    breaker = sidecar.running.runtime.guards["model"].breaker
    assert breaker is not None
    assert breaker.state == "open"
    status, body = await readyz(sidecar)
    assert status == 200  # the model's probes pass: still in service
    assert body["reasons"] == [
        "upstream model: circuit open while its probes pass; "
        "route all answers 503 circuit_open until a request closes it"
    ]
    state["up"] = True
    await sidecar.running.runtime.upstreams.probe_all()
    assert breaker.state == "open"  # the reset timeout is not over yet
    clock.advance(10)
    await sidecar.running.runtime.upstreams.probe_all()
    assert breaker.state == "half-open"
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 200
    assert breaker.state == "closed"
    status, body = await readyz(sidecar)
    assert (status, body) == (200, {"status": "ready"})


async def test_readiness_goes_stale_when_the_prober_stops(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(base_config(fake_model.url))
    assert (await readyz(sidecar))[0] == 200
    upstreams = sidecar.running.runtime.upstreams
    await upstreams._tasks.stop()  # the prober dies
    client = upstreams["model"]
    probe = client.last_probe
    assert probe is not None
    probe.checked_at -= 3600  # its last pass, an hour ago
    status, body = await readyz(sidecar)
    assert status == 503
    assert body["reasons"][0].startswith("upstream model: readiness probe stale (last ran 3600s")


async def test_a_hung_shadow_candidates_probe_never_makes_the_primary_stale(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """Each upstream is probed on its own schedule: a candidate whose readiness path
    hangs for its (longer) probe timeout must not hold back the primary's probes until
    the primary's last pass looks stale and the pod is taken out of service."""
    primary, candidate = await make_fake_model(), await make_fake_model()
    candidate.health_gate = asyncio.Event()  # never set: its probes hang
    config = base_config(primary.url)
    config["upstreams"]["model"]["health"] = {"interval": "200ms", "timeout": "500ms"}
    config["upstreams"]["candidate"] = {
        "url": candidate.url,
        "health": {"interval": "200ms", "timeout": "3s"},
    }
    config["routes"][0]["shadow"] = {"upstream": "candidate", "fraction": 0.0}
    sidecar = await start_sidecar(config, wait_ready=False)
    for _ in range(100):  # bounded: until it has started (its first pass done)
        async with sidecar.session.get(sidecar.admin_url + "/readyz") as resp:
            if resp.status == 200:
                break
        await asyncio.sleep(0.1)
    statuses = []
    # 4 s: past the primary's staleness limit (3 x 0.7 s), and past the candidate's
    # first probe timing out (3 s after the start).
    for _ in range(20):
        async with sidecar.session.get(sidecar.admin_url + "/readyz") as resp:
            statuses.append((resp.status, (await resp.json()).get("reasons")))
        await asyncio.sleep(0.2)
    assert all(status == 200 for status, _ in statuses), statuses
    candidate.health_gate.set()


async def test_a_hung_shadow_candidate_holds_back_neither_start_up_nor_a_reload(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """Readiness rests on the routes' upstreams and their secondary models: a candidate
    whose readiness path hangs for its 30 s probe timeout must not keep the pod
    "starting", nor a reload waiting, that long."""
    primary, candidate = await make_fake_model(), await make_fake_model()
    candidate.health_gate = asyncio.Event()  # never set: its probes hang
    config = base_config(primary.url)
    config["upstreams"]["candidate"] = {
        "url": candidate.url,
        "health": {"interval": "1h", "timeout": "30s"},
    }
    config["routes"][0]["shadow"] = {"upstream": "candidate", "fraction": 0.0}
    sidecar = await start_sidecar(config)  # waits at most 5 s for the first pass
    assert (await readyz(sidecar))[0] == 200
    assert (await asyncio.wait_for(sidecar.running.reload(), 5))["result"] == "ok"
    assert (await readyz(sidecar))[0] == 200
    candidate.health_gate.set()


async def test_a_reload_carries_on_the_last_probe_of_an_unchanged_upstream(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """An upstream a reload leaves as it was keeps its last probe result: the reload
    does not wait a probe pass for it (30 s here, its readiness path hanging), and its
    next probe, on schedule, decides as before."""
    config = base_config(fake_model.url)
    config["upstreams"]["model"]["health"] = {"interval": "1h", "timeout": "30s"}
    sidecar = await start_sidecar(config)
    fake_model.health_gate = asyncio.Event()  # from now on its probes hang
    assert (await asyncio.wait_for(sidecar.running.reload(), 5))["result"] == "ok"
    status, body = await readyz(sidecar)
    assert status == 200
    assert body == {"status": "ready"}
    fake_model.health_gate.set()


async def test_a_server_not_ready_is_not_asked_about_its_models(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Each model check would wait out its own timeout on a hung server: a pass stops
    at the server's answer when that says not ready."""
    model_state(fake_model)
    fake_model.health_status = 503
    sidecar = await start_sidecar(health_config(fake_model.url), wait_ready=False)
    await sidecar.running.runtime.upstreams.probe_all()
    status, body = await readyz(sidecar)
    assert status == 503
    assert body["reasons"] == ["upstream model: /v2/health/ready answered 503"]
    async with sidecar.session.get(sidecar.admin_url + "/health") as resp:
        checks = (await resp.json())["checks"]
    assert [c for c in checks if c.startswith("upstream:")] == ["upstream:model:ready"]
    assert fake_model.hits_for("/v2/models/iris/ready") == []
    fake_model.health_status = 200
    await sidecar.running.runtime.upstreams.probe_all()
    assert (await readyz(sidecar))[0] == 503  # the model is not loaded: now it is asked
    assert len(fake_model.hits_for("/v2/models/iris/ready")) == 1


async def test_a_busy_connection_pool_never_takes_a_healthy_model_out_of_service(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """Every pooled connection busy with slow answers (long generations, say) is load,
    not an outage: the readiness probe must still reach the model and pass."""
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if len(fake_model.hits_for("/infer")) == 2:
            arrived.set()
        await release.wait()
        return web.json_response({"ok": True})

    fake_model.on("/infer", slow)
    config = base_config(fake_model.url)
    config["upstreams"]["model"]["max_connections"] = 2
    config["upstreams"]["model"]["health"] = {"interval": "100ms", "timeout": "300ms"}
    sidecar = await start_sidecar(config)
    held = [
        asyncio.create_task(sidecar.session.post(sidecar.url + "/infer", data=b"{}"))
        for _ in range(2)
    ]
    await asyncio.wait_for(arrived.wait(), 10)
    statuses = []
    for _ in range(10):  # 1.5 s: several probes while the pool is full
        async with sidecar.session.get(sidecar.admin_url + "/readyz") as resp:
            statuses.append((resp.status, (await resp.json()).get("reasons")))
        await asyncio.sleep(0.15)
    release.set()
    for task in held:
        async with await task as resp:
            assert resp.status == 200
    assert all(status == 200 for status, _ in statuses), statuses


async def test_readiness_recovers_after_probes_timed_out_in_the_middle_of_an_answer(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A readiness answer whose body stalls past the probe timeout: the probe fails,
    and its connection must be given up, or the prober runs out of connections and
    the model stays 'not ready' after it recovered."""
    state = {"stall": True}
    never = asyncio.Event()

    async def ready(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 20
        await response.prepare(request)
        await response.write(b'{"ready": ')
        if state["stall"]:
            await never.wait()
        await response.write(b"true     }")
        return response

    fake_model.on("/stalling/ready", ready)
    config = base_config(fake_model.url)
    config["upstreams"]["model"]["health"] = {
        "path": "/stalling/ready",
        "interval": "50ms",
        "timeout": "200ms",
    }
    config["upstreams"]["model"]["max_connections"] = 2
    sidecar = await start_sidecar(config)
    try:
        for _ in range(100):  # until several probes have timed out mid-answer
            if len(fake_model.hits_for("/stalling/ready")) >= 5:
                break
            await asyncio.sleep(0.05)
        assert len(fake_model.hits_for("/stalling/ready")) >= 5
        state["stall"] = False
        for _ in range(100):  # bounded: 5 s
            async with sidecar.session.get(sidecar.admin_url + "/readyz") as resp:
                status, text = resp.status, await resp.text()
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200, text
        async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
            assert resp.status == 200  # and requests still get a connection
    finally:
        never.set()


async def test_a_fallback_that_only_asks_a_secondary_model_that_is_down_covers_nothing(
    make_fake_model: MakeFakeModel, start_sidecar: StartSidecar
) -> None:
    """Primary down, its route's only fallback a secondary model that is down too:
    every request fails, so the pod is not ready; 'degraded' (ready) once the
    secondary model is back."""
    primary, simple = await make_fake_model(), await make_fake_model()
    primary.health_status = simple.health_status = 503
    config = base_config(primary.url)
    config["upstreams"]["model"]["health"] = {"interval": "100ms", "timeout": "500ms"}
    config["upstreams"]["simple"] = {
        "url": simple.url,
        "health": {"interval": "100ms", "timeout": "500ms"},
    }
    config["routes"][0]["fallback"] = {"chain": [{"upstream": {"name": "simple"}}]}
    sidecar = await start_sidecar(config)
    status, body = await readyz(sidecar)
    assert status == 503, body
    assert "upstream model: /v2/health/ready answered 503" in body["reasons"]
    simple.health_status = 200
    for _ in range(50):  # bounded: 2.5 s
        await asyncio.sleep(0.05)
        async with sidecar.session.get(sidecar.admin_url + "/readyz") as resp:
            if resp.status == 200:
                break
    status, body = await readyz(sidecar)
    assert status == 200
    assert body["reasons"] == [
        "upstream model: /v2/health/ready answered 503; route all answers from its fallback"
    ]
