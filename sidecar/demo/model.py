"""A tiny model server for the demo and the tests.

It speaks the Open Inference Protocol (V2) subset the sidecar cares about, serves a
deterministic iris classifier whose weights are in this file, and can be broken on
purpose through ``POST /demo/chaos`` so that timeouts, retries, the breaker and the
fallbacks can be seen working.

    GET  /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer            4 features -> probabilities and a label
    POST /v2/models/{name}/generate_stream  server-sent events, one token per event
    POST /demo/chaos   {"mode": "ok"|"fail"|"hang"|"slow", "status": 503, "latency_ms": 200}
    GET  /demo/chaos   the current chaos settings and hit counters
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

CLASSES = ("setosa", "versicolor", "virginica")
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")

# Logits = W @ features + b. Production and candidate differ in one bias, so the
# candidate calls some wide-petalled versicolor flowers (petal width about 1.3 to
# 1.6) virginica: a known slice on which shadow comparison finds disagreement.
PRODUCTION_WEIGHTS = (
    (0.4, 0.9, -10.0, -1.0),
    (0.1, -0.3, 0.0, -3.0),
    (-0.1, -0.2, 0.3, 0.5),
)
PRODUCTION_BIAS = (24.0, 6.0, 0.0)
CANDIDATE_BIAS = (24.0, 5.0, 0.0)


@dataclass(frozen=True, slots=True)
class IrisModel:
    name: str
    version: str
    weights: tuple[tuple[float, ...], ...]
    bias: tuple[float, ...]

    def predict(self, row: list[float]) -> tuple[list[float], int]:
        logits = [
            sum(w * x for w, x in zip(ws, row, strict=True)) + b
            for ws, b in zip(self.weights, self.bias, strict=True)
        ]
        top = max(logits)
        exps = [math.exp(z - top) for z in logits]
        total = sum(exps)
        probs = [e / total for e in exps]
        return probs, max(range(len(probs)), key=probs.__getitem__)


def production_model() -> IrisModel:
    return IrisModel("iris", "1", PRODUCTION_WEIGHTS, PRODUCTION_BIAS)


def candidate_model() -> IrisModel:
    return IrisModel("iris", "2-candidate", PRODUCTION_WEIGHTS, CANDIDATE_BIAS)


@dataclass(slots=True)
class Chaos:
    mode: str = "ok"
    status: int = 503
    latency_ms: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    hits: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "hits": dict(self.hits),
        }


CHAOS: web.AppKey[Chaos] = web.AppKey("demo_chaos", Chaos)
MODEL: web.AppKey[IrisModel] = web.AppKey("demo_model", IrisModel)


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _v2_error(message: str, status: int = 400) -> web.Response:
    return _json({"error": message}, status=status)


async def _apply_chaos(request: web.Request, endpoint: str) -> web.Response | None:
    """Count the hit and act out the chaos mode; None means 'answer normally'."""
    chaos = request.app[CHAOS]
    chaos.hits[endpoint] = chaos.hits.get(endpoint, 0) + 1
    if chaos.mode == "hang":
        # Hang until the chaos settings change (or the client gives up).
        await chaos.changed.wait()
        return _v2_error("recovered from hang", status=503)
    if chaos.mode == "fail":
        return _v2_error(f"chaos: failing with {chaos.status}", status=chaos.status)
    if chaos.latency_ms > 0:
        await asyncio.sleep(chaos.latency_ms / 1000.0)
    return None


def parse_v2_rows(payload: Any) -> list[list[float]]:
    """Rows of 4 features from a V2 request; raises ValueError with a reason."""
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise ValueError("body must be a JSON object with an 'inputs' list")
    if not payload["inputs"]:
        raise ValueError("'inputs' is empty")
    tensor = payload["inputs"][0]
    if not isinstance(tensor, dict) or "data" not in tensor:
        raise ValueError("inputs[0] needs 'data'")
    data = tensor["data"]
    flat: list[Any] = []
    stack = [data]
    while stack:  # flatten nested lists, keeping order
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if not flat or len(flat) % len(FEATURES) != 0:
        raise ValueError(f"data must hold a multiple of {len(FEATURES)} numbers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        raise ValueError("data must hold numbers only")
    width = len(FEATURES)
    return [[float(v) for v in flat[i : i + width]] for i in range(0, len(flat), width)]


async def infer(request: web.Request) -> web.Response:
    model = request.app[MODEL]
    if request.match_info["name"] != model.name:
        return _v2_error(f"unknown model {request.match_info['name']!r}", status=404)
    chaos_answer = await _apply_chaos(request, "infer")
    if chaos_answer is not None:
        return chaos_answer
    try:
        payload = orjson.loads(await request.read())
        rows = parse_v2_rows(payload)
    except orjson.JSONDecodeError:
        return _v2_error("body is not valid JSON")
    except ValueError as exc:
        return _v2_error(str(exc))
    answer = v2_response(model, rows)
    answer["id"] = payload.get("id", request.headers.get("X-Request-ID", ""))
    return _json(answer)


def v2_response(model: IrisModel, rows: list[list[float]]) -> dict[str, Any]:
    """The V2 answer of ``model`` for ``rows``: probabilities and labels."""
    probabilities: list[float] = []
    labels: list[int] = []
    for row in rows:
        probs, label = model.predict(row)
        probabilities.extend(round(p, 6) for p in probs)
        labels.append(label)
    return {
        "model_name": model.name,
        "model_version": model.version,
        "outputs": [
            {
                "name": "probabilities",
                "shape": [len(rows), len(CLASSES)],
                "datatype": "FP32",
                "data": probabilities,
            },
            {"name": "label", "shape": [len(rows)], "datatype": "INT64", "data": labels},
        ],
    }


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one event per class name, then [DONE].

    A test can hold the stream open after the first event by sending
    ``{"hold": true}``; it is released by any ``POST /demo/chaos``.
    """
    chaos_answer = await _apply_chaos(request, "generate_stream")
    if chaos_answer is not None:
        return chaos_answer
    body = await request.read()
    hold = bool(body) and orjson.loads(body).get("hold") is True
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    chaos = request.app[CHAOS]
    for index, token in enumerate(CLASSES):
        await response.write(b"data: " + orjson.dumps({"index": index, "token": token}) + b"\n\n")
        if index == 0 and hold:
            await chaos.changed.wait()
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def set_chaos(request: web.Request) -> web.Response:
    chaos = request.app[CHAOS]
    try:
        settings = orjson.loads(await request.read())
        mode = settings.get("mode", "ok")
        if mode not in ("ok", "fail", "hang", "slow"):
            raise ValueError(f"unknown mode {mode!r}")
        status = int(settings.get("status", 503))
        latency_ms = float(settings.get("latency_ms", 200 if mode == "slow" else 0))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        return _v2_error(f"bad chaos settings: {exc}")
    chaos.mode, chaos.status, chaos.latency_ms = mode, status, latency_ms
    # Wake everything that hangs, then re-arm for the next hang.
    chaos.changed.set()
    chaos.changed = asyncio.Event()
    return _json(chaos.as_dict())


async def get_chaos(request: web.Request) -> web.Response:
    return _json(request.app[CHAOS].as_dict())


def build_model_app(model: IrisModel | None = None) -> web.Application:
    model = model if model is not None else production_model()
    app = web.Application()
    app[MODEL] = model
    app[CHAOS] = Chaos()

    async def live(request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(request: web.Request) -> web.Response:
        return _json({"ready": True})

    async def model_ready(request: web.Request) -> web.Response:
        if request.match_info["name"] != model.name:
            return _v2_error("unknown model", status=404)
        return _json({"name": model.name, "ready": True})

    async def metadata(request: web.Request) -> web.Response:
        if request.match_info["name"] != model.name:
            return _v2_error("unknown model", status=404)
        return _json(
            {
                "name": model.name,
                "versions": [model.version],
                "platform": "python",
                "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, len(FEATURES)]}],
                "outputs": [
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                ],
            }
        )

    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{name}", metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_post("/v2/models/{name}/generate_stream", generate_stream)
    app.router.add_post("/demo/chaos", set_chaos)
    app.router.add_get("/demo/chaos", get_chaos)
    return app
