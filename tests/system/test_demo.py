"""The demo: its model answers correctly, chaos works, and `sidecar demo` serves."""

from __future__ import annotations

import asyncio
import io
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.demo.model import (
    CLASSES,
    ModelServer,
    candidate_model,
    parse_v2_rows,
    production_model,
)
from sidecar.demo.runner import DEMO_INPUT, DEMO_KEY
from tests.conftest import Demo

CHAOS_SCRIPT = Path(__file__).resolve().parents[2] / "loadtests" / "chaos.py"
SETOSA = [5.1, 3.5, 1.4, 0.2]
VERSICOLOR = [5.7, 2.6, 3.5, 1.0]
WIDE_VERSICOLOR = [6.0, 2.9, 4.5, 1.5]  # in the slice the candidate gets wrong
VIRGINICA = [6.9, 3.1, 5.4, 2.1]


def v2_request(*rows: list[float]) -> dict[str, Any]:
    flat = [v for row in rows for v in row]
    return {
        "inputs": [{"name": "input-0", "shape": [len(rows), 4], "datatype": "FP32", "data": flat}]
    }


@pytest.mark.parametrize(
    ("row", "label"), [(SETOSA, 0), (VERSICOLOR, 1), (WIDE_VERSICOLOR, 1), (VIRGINICA, 2)]
)
def test_production_model_labels_classic_flowers(row: list[float], label: int) -> None:
    probs, predicted = production_model().predict(row)
    assert predicted == label
    assert sum(probs) == pytest.approx(1.0)
    assert len(probs) == len(CLASSES)


def test_candidate_disagrees_only_on_its_known_slice() -> None:
    candidate = candidate_model()
    assert candidate.predict(WIDE_VERSICOLOR)[1] == 2
    for row in (SETOSA, VERSICOLOR, VIRGINICA):
        assert candidate.predict(row)[1] == production_model().predict(row)[1]


def test_v2_rows_accept_flat_and_nested_data() -> None:
    assert parse_v2_rows(v2_request(SETOSA, VIRGINICA)) == [SETOSA, VIRGINICA]
    nested = {"inputs": [{"data": [SETOSA, VIRGINICA]}]}
    assert parse_v2_rows(nested) == [SETOSA, VIRGINICA]
    for bad in (
        {},
        {"inputs": []},
        {"inputs": [{"data": [1, 2, 3]}]},
        {"inputs": [{"data": ["a", "b", "c", "d"]}]},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each has its own message
            parse_v2_rows(bad)


class ModelClient:
    """``get`` and ``post`` of paths on one server."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def get(self, path: str) -> aiohttp.ClientResponse:
        return await self.session.get(self.base + path)

    async def post(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.session.post(self.base + path, **kwargs)


@pytest.fixture
async def client() -> AsyncIterator[ModelClient]:
    """A session against the demo's model server on its own port."""
    server = ModelServer()
    port = await server.listen("127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        yield ModelClient(session, f"http://127.0.0.1:{port}")
    await server.stop()


async def test_model_server_batch_and_chaos(client: ModelClient) -> None:
    resp = await client.post("/v2/models/iris/infer", json=v2_request(SETOSA, VIRGINICA))
    assert resp.status == 200
    body = await resp.json()
    assert body["outputs"][1]["data"] == [0, 2]
    assert body["outputs"][0]["shape"] == [2, 3]

    resp = await client.post("/demo/chaos", json={"mode": "fail", "status": 500})
    assert resp.status == 200
    resp = await client.post("/v2/models/iris/infer", json=v2_request(SETOSA))
    assert resp.status == 500

    resp = await client.post("/demo/chaos", json={"mode": "hang"})
    hanging = asyncio.create_task(client.post("/v2/models/iris/infer", json=v2_request(SETOSA)))
    for _ in range(500):  # bounded: until the hanging request has reached the model
        if (await (await client.get("/demo/chaos")).json())["hits"]["infer"] == 3:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the request never reached the model")
    assert not hanging.done()
    await client.post("/demo/chaos", json={"mode": "ok"})
    assert (await hanging).status == 503

    resp = await client.post("/demo/chaos", json={"mode": "explode"})
    assert resp.status == 400


async def test_model_server_routes(client: ModelClient) -> None:
    """What the V2 clients and the sidecar's probes ask of a model server."""
    for path, expected in (
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/iris/ready", {"name": "iris", "ready": True}),
    ):
        resp = await client.get(path)
        assert (resp.status, await resp.json()) == (200, expected), path
    metadata = await (await client.get("/v2/models/iris")).json()
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"][0]["shape"] == [-1, 4]
    for method, path, status in (
        ("GET", "/v2/models/other/ready", 404),
        ("GET", "/nowhere", 404),
        ("GET", "/v2/models/iris/infer", 405),
        ("POST", "/v2/health/live", 405),
        ("PUT", "/demo/chaos", 405),
    ):
        resp = await client.session.request(method, client.base + path)
        assert resp.status == status, (method, path)
        assert "error" in await resp.json()
    resp = await client.post("/v2/models/iris/infer", data=b"{not json")
    assert (resp.status, await resp.json()) == (400, {"error": "body is not valid JSON"})
    resp = await client.post("/v2/models/iris/infer", data=io.BytesIO(b"x" * ((1 << 20) + 1)))
    assert resp.status == 413


async def test_generate_stream_sends_events(client: ModelClient) -> None:
    resp = await client.post("/v2/models/iris/generate_stream", json={})
    assert resp.headers["Content-Type"] == "text/event-stream"
    text = await resp.text()
    assert text.count("data: ") == 4
    assert text.endswith("data: [DONE]\n\n")


async def test_sidecar_demo_command_serves_a_prediction(demo: Demo) -> None:
    infer_url = demo.url("sidecar") + "/v2/models/iris/infer"
    assert DEMO_INPUT in demo.banner
    assert f"Authorization: Bearer {DEMO_KEY}" in demo.banner
    assert infer_url in demo.banner  # the curl command, ready to paste
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {DEMO_KEY}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(infer_url, data=DEMO_INPUT, headers=auth) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
        assert "X-Request-ID" in resp.headers
        assert "upstream;dur=" in resp.headers["Server-Timing"]
    assert body["outputs"][1]["data"] == [0]

    # Break the model: the rule-based fallback answers in the model's own format.
    async with aiohttp.ClientSession() as session:
        async with session.post(
            demo.url("model") + "/demo/chaos", json={"mode": "fail", "status": 503}
        ) as resp:
            assert resp.status == 200
        wide = DEMO_INPUT.replace("5.1,3.5,1.4,0.2", "6.9,3.1,5.4,2.1")
        async with session.post(infer_url, data=wide, headers=auth) as resp:
            assert resp.status == 200
            assert resp.headers["X-Sidecar-Fallback"] == "rule-virginica"
            assert (await resp.json())["outputs"][0]["data"] == [2]
    demo.process.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(demo.process.wait, 30) == 0


async def run_chaos(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    out = tmp_path / "chaos.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHAOS_SCRIPT),
        *args,
        "--json",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    return process.returncode, stdout.decode() + stderr.decode(), report


async def test_chaos_run_fails_when_the_sidecar_refuses_its_requests(tmp_path: Path) -> None:
    code, text, report = await run_chaos(
        tmp_path, "--phase-seconds", "0.3", "--concurrency", "2", "--key", "not-the-key"
    )
    assert code == 1, text
    assert "phase ok: no answer came from the model" in report["problems"]
    assert any("401:unauthorized" in problem for problem in report["problems"])
    assert "chaos run: failed" in text


async def test_a_reload_of_the_demo_keeps_its_ports(demo: Demo) -> None:
    """The demo's config reads its ports from variables the demo sets; a reload must
    read the same ones, not the defaults (8081, 8082)."""
    infer_url = demo.url("sidecar") + "/v2/models/iris/infer"
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {DEMO_KEY}"}
    admin = demo.url("admin").removesuffix("/health")
    async with aiohttp.ClientSession() as session:
        async with session.post(admin + "/-/reload") as resp:
            assert resp.status == 200, await resp.text()
        async with session.post(infer_url, data=DEMO_INPUT, headers=auth) as resp:
            assert resp.status == 200
            assert "X-Sidecar-Fallback" not in resp.headers  # the model itself answered
        async with session.get(admin + "/health") as resp:
            assert (await resp.json())["status"] == "pass"
