"""The client packages users have, through the sidecar: tritonclient against a V2
route and the openai package against an OpenAI-style route. They must read the
sidecar's errors as their own, and complete streams must count as complete."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import orjson
import pytest
import tritonclient.http as triton
from aiohttp import web
from tritonclient.utils import InferenceServerException

from sidecar.demo.model import ModelServer
from tests.conftest import LOOPBACK, StartSidecar, base_config
from tests.integration.test_correctness import ListSink, flushed


@dataclass
class Iris:
    port: int


@pytest.fixture
async def iris() -> AsyncIterator[Iris]:
    """The demo's model server, on its own port."""
    server = ModelServer()
    port = await server.listen(LOOPBACK, 0)
    yield Iris(port)
    await server.stop()


def v2_config(upstream: str) -> dict[str, Any]:
    config = base_config(upstream)
    config["routes"] = [
        {
            "name": "infer",
            "path_prefix": "/v2",
            "upstream": "model",
            "protocol": "v2",
            "timeout": "500ms",
        }
    ]
    config["upstreams"]["model"]["breaker"] = {"enabled": False}
    return config


async def test_tritonclient_infers_and_reads_the_sidecars_errors(
    iris: Iris, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(v2_config(f"http://{LOOPBACK}:{iris.port}"))

    def infer() -> Any:
        client = triton.InferenceServerClient(f"{LOOPBACK}:{sidecar.running.main_port}")
        try:
            tensor = triton.InferInput("input-0", [1, 4], "FP32")
            tensor.set_data_from_numpy(
                np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32), binary_data=False
            )
            output = triton.InferRequestedOutput("label", binary_data=False)
            return client.infer("iris", [tensor], outputs=[output]).as_numpy("label")
        finally:
            client.close()

    labels = await asyncio.to_thread(infer)
    assert labels.tolist() == [0]

    async with sidecar.session.post(
        f"http://{LOOPBACK}:{iris.port}/demo/chaos", json={"mode": "hang"}
    ) as resp:
        assert resp.status == 200
    try:
        with pytest.raises(InferenceServerException) as caught:
            await asyncio.to_thread(infer)
    finally:
        async with sidecar.session.post(
            f"http://{LOOPBACK}:{iris.port}/demo/chaos", json={"mode": "ok"}
        ):
            pass
    # tritonclient prints V2's string error: ours, not a TypeError of its own.
    assert "did not start answering" in str(caught.value)
    assert caught.value.status() == "504"


async def test_a_method_the_v2_route_does_not_take_is_refused_in_v2s_shape(
    iris: Iris, start_sidecar: StartSidecar
) -> None:
    # The path is the v2 route's, the method is not: the 405 came in the plain shape,
    # and tritonclient printed a dict where V2 clients read a string.
    config = v2_config(f"http://{LOOPBACK}:{iris.port}")
    config["routes"][0]["methods"] = ["POST"]
    sidecar = await start_sidecar(config)

    def metadata() -> Any:
        client = triton.InferenceServerClient(f"{LOOPBACK}:{sidecar.running.main_port}")
        try:
            return client.get_model_metadata("iris")
        finally:
            client.close()

    with pytest.raises(InferenceServerException) as caught:
        await asyncio.to_thread(metadata)
    assert caught.value.status() == "405"
    assert caught.value.message() == "method GET is not allowed here"


MODEL_DOWN = web.AppKey("model_down", list[bool])


async def binary_v2_model(request: web.Request) -> web.Response:
    """A V2 server using the binary tensor extension as Triton does: a JSON head of
    Inference-Header-Content-Length bytes, then the tensors' raw bytes. 503 once
    told to fail."""
    if request.app[MODEL_DOWN][0]:
        return web.json_response({"error": "unavailable"}, status=503)
    raw = await request.read()
    size = request.headers.get("Inference-Header-Content-Length")
    document = orjson.loads(raw[: int(size)] if size else raw)
    head: dict[str, Any] = {"model_name": "iris", "model_version": "1"}
    if "id" in document:
        head["id"] = document["id"]
    data = struct.pack("<q", 2)
    head["outputs"] = [
        {
            "name": "label",
            "shape": [1],
            "datatype": "INT64",
            "parameters": {"binary_data_size": len(data)},
        }
    ]
    json_head = orjson.dumps(head)
    return web.Response(
        body=json_head + data,
        content_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(json_head))},
    )


async def binary_v2_server(aiohttp_server: Any) -> tuple[Any, list[bool]]:
    """``binary_v2_model`` on a port of its own, and the flag that takes it down."""
    app = web.Application()
    app[MODEL_DOWN] = down = [False]
    app.router.add_post("/v2/models/iris/infer", binary_v2_model)
    app.router.add_get("/v2/health/ready", _ok)
    return await aiohttp_server(app, host=LOOPBACK), down


def infer_binary(port: int, row: list[float], *, ask_for_label: bool = False) -> list[int]:
    """tritonclient with its defaults: the row as a binary tensor, and (when it asks
    for the label output) the label asked for as a binary one."""
    client = triton.InferenceServerClient(f"{LOOPBACK}:{port}")
    try:
        tensor = triton.InferInput("input-0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([row], dtype=np.float32))
        outputs = [triton.InferRequestedOutput("label")] if ask_for_label else None
        result = client.infer("iris", [tensor], outputs=outputs)
        return result.as_numpy("label").tolist()  # type: ignore[no-any-return]
    finally:
        client.close()


IRIS_ROW = [6.9, 3.1, 5.4, 2.1]


async def test_a_cached_binary_v2_answer_reads_in_tritonclient(
    aiohttp_server: Any, start_sidecar: StartSidecar
) -> None:
    # tritonclient asks for binary outputs by default. The cache kept such an answer's
    # body and Content-Type but not its Inference-Header-Content-Length: served while
    # the model was down, tritonclient read JSON followed by tensor bytes and failed
    # with a JSONDecodeError of its own.
    model, down = await binary_v2_server(aiohttp_server)
    config = v2_config(f"http://{LOOPBACK}:{model.port}")
    config["routes"][0]["fallback"] = {"chain": [{"cache": {}}]}
    sidecar = await start_sidecar(config)

    def infer(request_id: str) -> tuple[list[int], str | None]:
        client = triton.InferenceServerClient(f"{LOOPBACK}:{sidecar.running.main_port}")
        try:
            tensor = triton.InferInput("input-0", [1, 4], "FP32")
            tensor.set_data_from_numpy(
                np.array([[6.9, 3.1, 5.4, 2.1]], dtype=np.float32), binary_data=False
            )
            result = client.infer(
                "iris",
                [tensor],
                outputs=[triton.InferRequestedOutput("label")],
                request_id=request_id,
            )
            return result.as_numpy("label").tolist(), result.get_response().get("id")
        finally:
            client.close()

    assert await asyncio.to_thread(infer, "first") == ([2], "first")
    down[0] = True
    # From the cache: the tensor read, and the id this request's.
    assert await asyncio.to_thread(infer, "second") == ([2], "second")
    assert await asyncio.to_thread(infer, "") == ([2], None)


async def test_tritonclients_binary_tensors_pass_a_strict_json_v2_route(
    aiohttp_server: Any, start_sidecar: StartSidecar
) -> None:
    # tritonclient sends a numpy array as binary data by default: a JSON head of
    # Inference-Header-Content-Length bytes, then the tensor's bytes. The route
    # `sidecar init --protocol v2` writes checks strict JSON, and answered every such
    # request 400 "the body is not valid JSON". Now the head is what is checked.
    model, _ = await binary_v2_server(aiohttp_server)
    config = v2_config(f"http://{LOOPBACK}:{model.port}")
    config["routes"][0]["validate"] = {"json": True, "max_depth": 8}
    sidecar = await start_sidecar(config)

    assert await asyncio.to_thread(infer_binary, sidecar.running.main_port, IRIS_ROW) == [2]
    # The head is checked as strictly as a whole JSON body is; a length that cannot
    # be the head's is refused.
    url = f"{sidecar.url}/v2/models/iris/infer"
    for head, length in (
        (b'{"inputs": [], "inputs": []}', None),
        (b"[" * 20 + b"]" * 20, None),
        (b"{NaN}", None),
        (b'{"inputs": []}', "99"),
        (b'{"inputs": []}', "x"),
        (b'{"inputs": []}', "1" * 5000),  # past int()'s 4,300 digits: was a 500
    ):
        size = length or str(len(head))
        headers = {"Inference-Header-Content-Length": size}
        async with sidecar.session.post(url, data=head + b"\x00\x01", headers=headers) as resp:
            body = orjson.loads(await resp.read())
        assert resp.status == 400, (head, length)
        assert body["type"] == "invalid_json"


async def test_tritonclients_binary_tensors_are_checked_against_the_routes_schema(
    aiohttp_server: Any, start_sidecar: StartSidecar
) -> None:
    # The bundled iris schema requires inputs[0].data, which a binary request's JSON
    # head never has: every tritonclient request with its default binary tensors was
    # refused 400 as failing the schema. The tensors' elements are now the data the
    # schema checks, out-of-range values included.
    from sidecar.config.schema import bundled_config_dir

    model, _ = await binary_v2_server(aiohttp_server)
    config = v2_config(f"http://{LOOPBACK}:{model.port}")
    schema = bundled_config_dir() / "schemas" / "iris-v2-request.json"
    config["routes"][0]["validate"] = {"json": True, "schema": str(schema)}
    sidecar = await start_sidecar(config)

    port = sidecar.running.main_port
    assert await asyncio.to_thread(infer_binary, port, IRIS_ROW) == [2]
    with pytest.raises(InferenceServerException) as caught:
        # The schema's maximum is 100.
        await asyncio.to_thread(infer_binary, port, [6.9, 3.1, 500.0, 2.1])
    assert caught.value.status() == "422"  # the schema's answer, as for JSON
    assert "inputs[0].data[2]" in (caught.value.message() or "")
    # Tensors that do not fit the body are refused as the malformed request they are.
    head = b'{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP32",'
    head += b'"parameters":{"binary_data_size":16}}]}'
    url = f"{sidecar.url}/v2/models/iris/infer"
    headers = {"Inference-Header-Content-Length": str(len(head))}
    async with sidecar.session.post(url, data=head + b"\x00" * 8, headers=headers) as resp:
        body = orjson.loads(await resp.read())
    assert (resp.status, body["type"]) == (400, "invalid_json")
    assert "runs past the body" in body["error"]


async def test_a_large_binary_request_is_checked_against_the_schema_in_a_thread(
    aiohttp_server: Any, start_sidecar: StartSidecar, tmp_path: Path, monkeypatch: Any
) -> None:
    """Checked as the lists its tensors make, a binary body is Python work in
    proportion to its elements (4 MB of empty BYTES strings held the loop 1.4 s, found
    by the reviewing helper): past 16 KiB it is checked in a thread, as correctly."""
    threaded: list[str] = []
    to_thread = asyncio.to_thread

    async def recording(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        threaded.append(getattr(func, "__name__", "?"))
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", recording)
    schema = tmp_path / "schema.json"
    numbers = {"type": "array", "items": {"type": "number", "maximum": 100}}
    schema.write_bytes(
        orjson.dumps(
            {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "inputs": {"type": "array", "items": {"properties": {"data": numbers}}}
                },
            }
        )
    )
    model, _ = await binary_v2_server(aiohttp_server)
    config = v2_config(f"http://{LOOPBACK}:{model.port}")
    config["routes"][0]["validate"] = {"json": True, "schema": str(schema)}
    sidecar = await start_sidecar(config)
    url = f"{sidecar.url}/v2/models/iris/infer"

    async def post(values: list[float]) -> tuple[int, Any]:
        raw = struct.pack(f"<{len(values)}f", *values)
        tensor = {"name": "x", "datatype": "FP32", "shape": [1, len(values)]}
        head = orjson.dumps({"inputs": [tensor | {"parameters": {"binary_data_size": len(raw)}}]})
        headers = {"Inference-Header-Content-Length": str(len(head))}
        async with sidecar.session.post(url, data=head + raw, headers=headers) as resp:
            return resp.status, await resp.read()

    assert (await post([1.0] * 4))[0] == 200
    assert threaded == []  # small: checked where it is
    large = [1.0] * 8192  # 32 KiB of tensor
    assert (await post(large))[0] == 200
    assert threaded == ["check_body"]
    large[5000] = 500.0
    status, body = await post(large)
    assert status == 422
    assert "inputs[0].data[5000]" in orjson.loads(body)["error"]
    assert threaded == ["check_body", "check_body", "violation"]


async def test_tritonclients_binary_tensors_reach_drift_the_payload_log_and_the_rules(
    aiohttp_server: Any, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    # With tritonclient's defaults (binary inputs, binary outputs) drift skipped every
    # pair unseen and uncounted, the payload log wrote {"non_json": true}, and a rule
    # on inputs[0].data[2] never matched: the model down, the client got a 503.
    model, down = await binary_v2_server(aiohttp_server)
    config = v2_config(f"http://{LOOPBACK}:{model.port}")
    payloads = tmp_path / "payloads.jsonl"
    config["logging"] = {"payload_log": {"path": str(payloads)}}
    route = config["routes"][0]
    route["payload_sample"] = 1.0
    route["drift"] = {
        "protocol": "v2",
        "output": "label",
        "baseline": str(tmp_path / "frozen.json"),
        "freeze_after": 10,
        "min_samples": 10,
        "features": [{"name": "petal_length", "field": "inputs[0].data[2]"}],
    }
    route["fallback"] = {
        "chain": [
            {
                "rules": [
                    {
                        "name": "long-petals",
                        "when": {"field": "inputs[0].data[2]", "gt": 5},
                        "respond": {
                            "body": {
                                "outputs": [
                                    {
                                        "name": "label",
                                        "datatype": "INT64",
                                        "shape": [1],
                                        "data": [2],
                                    }
                                ]
                            },
                        },
                    }
                ]
            }
        ]
    }
    sidecar = await start_sidecar(config)

    def infer() -> list[int]:
        return infer_binary(sidecar.running.main_port, IRIS_ROW, ask_for_label=True)

    assert [await asyncio.to_thread(infer) for _ in range(2)] == [[2], [2]]
    monitor = sidecar.running.runtime.paths["infer"].drift
    assert monitor is not None
    monitor.evaluate()
    assert list(monitor._windows["prediction"]) == [2.0, 2.0]
    assert list(monitor._windows["petal_length"]) == [pytest.approx(5.4)] * 2
    down[0] = True
    assert await asyncio.to_thread(infer) == [2]  # the rule read the binary tensor
    await sidecar.running.stop()
    first = orjson.loads(payloads.read_text().splitlines()[0])
    assert first["request"]["inputs"][0]["data"] == pytest.approx([6.9, 3.1, 5.4, 2.1])
    assert first["response"]["outputs"][0]["data"] == [2]


CHUNKS = [
    {"choices": [{"index": 0, "delta": {"content": word}}], "object": "chat.completion.chunk"}
    for word in ("iris", " is", " setosa")
]


def fake_openai_server() -> web.Application:
    release = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if payload.get("model") == "hang":
            await release.wait()
        if not payload.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": payload["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "setosa"},
                        }
                    ],
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in CHUNKS:
            base = {"id": "chatcmpl-1", "created": 1, "model": payload["model"]}
            await response.write(b"data: " + orjson.dumps({**base, **chunk}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(0.05)  # the client has what it needs and closes first
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v2/health/ready", _ok)
    return app


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({})


async def test_openai_streams_complete_as_200_and_errors_read_as_openai_errors(
    aiohttp_server: Any, start_sidecar: StartSidecar
) -> None:
    model = await aiohttp_server(fake_openai_server(), host=LOOPBACK)
    config = base_config(f"http://{LOOPBACK}:{model.port}")
    config["routes"] = [
        {
            "name": "chat",
            "path_prefix": "/v1",
            "upstream": "model",
            "protocol": "openai",
            "timeout": "500ms",
        }
    ]
    sink = ListSink()
    sidecar = await start_sidecar(config, log_sinks={"access": sink})
    client = openai.AsyncOpenAI(
        base_url=f"{sidecar.url}/v1", api_key="unused", max_retries=0, timeout=10
    )
    try:
        streams = 20
        for _ in range(streams):
            stream = await client.chat.completions.create(
                model="iris-llm", messages=[{"role": "user", "content": "?"}], stream=True
            )
            words = [chunk.choices[0].delta.content async for chunk in stream]
            assert "".join(w or "" for w in words) == "iris is setosa"
        answer = await client.chat.completions.create(
            model="iris-llm", messages=[{"role": "user", "content": "?"}]
        )
        assert answer.choices[0].message.content == "setosa"
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="hang", messages=[{"role": "user", "content": "?"}]
            )
    finally:
        await client.close()
    error = caught.value
    assert error.status_code == 504
    assert error.code == "upstream_timeout"
    assert "did not start answering" in error.message
    records = await flushed(sidecar, sink, streams + 2)
    completed = [r for r in records if r["status"] == 200]
    assert len(completed) == streams + 1  # every stream counted complete: none a 500
    assert {r["outcome"] for r in completed} == {"ok"}


async def test_a_canned_fallback_answers_an_openai_stream_as_a_stream(
    aiohttp_server: Any, start_sidecar: Any
) -> None:
    # The model down, a rule answers with a chat completion. To a request with
    # "stream": true it went as that JSON: the openai package found no event in it
    # and gave an empty stream, no error: a completion silently lost.
    model = await aiohttp_server(fake_openai_server(), host=LOOPBACK)
    config = base_config(f"http://{LOOPBACK}:{model.port}")
    answer = {
        "id": "fallback-1",
        "object": "chat.completion",
        "created": 1,
        "model": "rules",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "try again later"},
            }
        ],
    }
    config["routes"] = [
        {
            "name": "chat",
            "path_prefix": "/v1",
            "upstream": "model",
            "protocol": "openai",
            "timeout": "200ms",
            "fallback": {
                "chain": [
                    {
                        "rules": [
                            {
                                "name": "busy",
                                "when": {"field": "model", "eq": "hang"},
                                "respond": {"status": 200, "body": answer},
                            }
                        ]
                    }
                ]
            },
        }
    ]
    sidecar = await start_sidecar(config)
    client = openai.AsyncOpenAI(
        base_url=f"{sidecar.url}/v1", api_key="unused", max_retries=0, timeout=10
    )
    try:
        stream = await client.chat.completions.with_raw_response.create(
            model="hang", messages=[{"role": "user", "content": "?"}], stream=True
        )
        assert stream.headers["X-Sidecar-Fallback"] == "busy"
        chunks = [chunk async for chunk in stream.parse()]
        whole = await client.chat.completions.create(
            model="hang", messages=[{"role": "user", "content": "?"}]
        )
    finally:
        await client.close()
    assert [c.choices[0].delta.content for c in chunks] == ["try again later"]
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].finish_reason == "stop"
    # Without "stream", the configured answer as it is.
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.content == "try again later"
