"""A tiny model server for the demo and the tests.

It speaks the Open Inference Protocol (V2) subset the sidecar cares about, serves a
deterministic iris classifier whose weights are in this file, and can be broken on
purpose through ``POST /demo/chaos`` so that timeouts, retries, the breaker and the
fallbacks can be seen working. It runs on the sidecar's own HTTP server, so the
demo needs nothing that `pip install .` did not bring.

    GET  /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready
    POST /v2/models/{name}/infer            4 features -> probabilities and a label
    POST /v2/models/{name}/generate_stream  server-sent events, one token per event
    POST /demo/chaos   {"mode": "ok"|"fail"|"hang"|"slow", "status": 503, "latency_ms": 200}
    GET  /demo/chaos   the current chaos settings and hit counters

    python -m sidecar.demo.model PORT       the production model alone, on 127.0.0.1
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.http.messages import Answer, Headers, Response
from sidecar.http.server import HttpServer, Request, RequestRefused

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


MAX_BODY = 1 << 20  # a demo model reads small requests
_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(/ready|/infer|/generate_stream)?")


def _json(payload: object, status: int = 200) -> Response:
    return Response(status, orjson.dumps(payload), content_type="application/json")


def _v2_error(message: str, status: int = 400) -> Response:
    return _json({"error": message}, status=status)


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


class ModelServer:
    """One model's endpoints on the sidecar's HTTP server (``listen``, ``stop``)."""

    def __init__(self, model: IrisModel | None = None) -> None:
        self.model = model if model is not None else production_model()
        self.chaos = Chaos()
        self.http = HttpServer(self.handle, self.refuse)

    async def listen(self, host: str, port: int) -> int:
        """Start serving on ``host:port``; returns the bound port (``port`` 0: any)."""
        return await self.http.listen(host, port)

    async def stop(self) -> None:
        self.chaos.changed.set()  # hanging requests answer before the drain ends
        await self.http.stop(drain_timeout=1.0)

    def refuse(self, refusal: RequestRefused, method: str, target: str, peer: str) -> Response:
        return _v2_error(refusal.message, status=refusal.status)

    async def handle(self, request: Request) -> Answer:
        try:
            return await self._route(request)
        except RequestRefused as refusal:  # a body too large or too slow
            return self.refuse(refusal, request.method, request.target, request.peer)

    async def _route(self, request: Request) -> Answer:
        path, method = request.path, request.method
        reading = method in ("GET", "HEAD")
        if path == "/demo/chaos":
            if reading:
                return _json(self.chaos.as_dict())
            return await self._set_chaos(request) if method == "POST" else _not_allowed()
        if path in ("/v2/health/live", "/v2/health/ready"):
            if not reading:
                return _not_allowed()
            return _json({"live": True} if path.endswith("live") else {"ready": True})
        match = _MODEL_PATH.fullmatch(path)
        if match is None:
            return _v2_error(f"no endpoint {path!r}", status=404)
        name, action = match.group(1), match.group(2)
        if name != self.model.name:
            return _v2_error(f"unknown model {name!r}", status=404)
        if action in ("/infer", "/generate_stream"):
            if method != "POST":
                return _not_allowed()
            if action == "/infer":
                return await self._infer(request)
            return await self._generate_stream(request)
        if not reading:
            return _not_allowed()
        if action == "/ready":
            return _json({"name": name, "ready": True})
        return _json(self._metadata())

    async def _apply_chaos(self, endpoint: str) -> Response | None:
        """Count the hit and act out the chaos mode; None means 'answer normally'."""
        chaos = self.chaos
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

    async def _infer(self, request: Request) -> Response:
        chaos_answer = await self._apply_chaos("infer")
        if chaos_answer is not None:
            return chaos_answer
        try:
            payload = orjson.loads(await request.read_body(MAX_BODY))
            rows = parse_v2_rows(payload)
        except orjson.JSONDecodeError:
            return _v2_error("body is not valid JSON")
        except ValueError as exc:
            return _v2_error(str(exc))
        answer = v2_response(self.model, rows)
        answer["id"] = payload.get("id", request.headers.get("X-Request-ID", ""))
        return _json(answer)

    async def _generate_stream(self, request: Request) -> Answer:
        """Server-sent events: one event per class name, then [DONE].

        A test can hold the stream open after the first event by sending
        ``{"hold": true}``; it is released by any ``POST /demo/chaos``.
        """
        chaos_answer = await self._apply_chaos("generate_stream")
        if chaos_answer is not None:
            return chaos_answer
        body = await request.read_body(MAX_BODY)
        try:
            hold = bool(body) and orjson.loads(body).get("hold") is True
        except (orjson.JSONDecodeError, AttributeError):
            return _v2_error("body must be a JSON object")
        headers = Headers([("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        writer = await request.stream(200, None, headers)
        for index, token in enumerate(CLASSES):
            await writer.write(b"data: " + orjson.dumps({"index": index, "token": token}) + b"\n\n")
            if index == 0 and hold:
                await self.chaos.changed.wait()
        await writer.write(b"data: [DONE]\n\n")
        await writer.end()
        return writer.answer

    async def _set_chaos(self, request: Request) -> Response:
        chaos = self.chaos
        try:
            settings = orjson.loads(await request.read_body(MAX_BODY))
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

    def _metadata(self) -> dict[str, Any]:
        model = self.model
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": "python",
            "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, len(FEATURES)]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                {"name": "label", "datatype": "INT64", "shape": [-1]},
            ],
        }


def _not_allowed() -> Response:
    return _v2_error("method not allowed", status=405)


async def serve(port: int, model: IrisModel | None = None) -> None:
    """Serve ``model`` on 127.0.0.1:``port`` until SIGINT or SIGTERM."""
    server = ModelServer(model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.listen("127.0.0.1", port)
    try:
        await stop.wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m sidecar.demo.model PORT")
    asyncio.run(serve(int(sys.argv[1])))
