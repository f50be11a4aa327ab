"""The sidecar's own endpoints. They are never forwarded to the model server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.metrics import CONTENT_TYPE
from sidecar.runtime import Runtime

CurrentRuntime = Callable[[], Runtime]
Reload = Callable[[], Awaitable[dict[str, Any]]]


def current_handler(current: CurrentRuntime, make: Callable[[Runtime], Handler]) -> Handler:
    """A handler that always serves from the runtime in service, across reloads."""
    built: list[tuple[Runtime, Handler]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        runtime = current()
        if not built or built[0][0] is not runtime:
            built[:] = [(runtime, make(runtime))]
        return await built[0][1](request)

    return handle


def reload_handler(reload: Reload) -> Handler:
    async def do_reload(request: web.Request) -> web.Response:
        result = await reload()
        return _json(result, status=200 if result["result"] == "ok" else 400)

    return do_reload


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def livez_handler(runtime: Runtime) -> Handler:
    async def livez(request: web.Request) -> web.Response:
        # Answering at all proves the process and its event loop are alive.
        return _json({"status": "alive"})

    return livez


def _not_ready_reasons(runtime: Runtime) -> list[str]:
    if runtime.draining:
        return ["draining: the sidecar is shutting down"]
    if not runtime.upstreams.first_pass_done.is_set():
        return ["starting: the first readiness probe has not finished"]
    return [
        f"upstream {client.name}: {client.last_probe.error if client.last_probe else 'unknown'}"
        for client in runtime.upstreams.clients.values()
        if not client.ready
    ]


def readyz_handler(runtime: Runtime) -> Handler:
    async def readyz(request: web.Request) -> web.Response:
        # Served from the background probe's cached verdict: a probe storm from
        # Kubernetes never turns into calls to the model.
        reasons = _not_ready_reasons(runtime)
        if reasons:
            return _json({"status": "not_ready", "reasons": reasons}, status=503)
        return _json({"status": "ready"})

    return readyz


def health_handler(runtime: Runtime) -> Handler:
    async def health(request: web.Request) -> web.Response:
        checks = {}
        for client in runtime.upstreams.clients.values():
            probe = client.last_probe
            checks[f"upstream:{client.name}"] = {
                "status": "pending" if probe is None else ("pass" if probe.ready else "fail"),
                "latency_ms": None if probe is None else round(probe.latency * 1000.0, 3),
                "last_error": None if probe is None else probe.error,
                "last_checked": None if probe is None else probe.checked_at,
                "last_success": client.last_success,
            }
        reasons = _not_ready_reasons(runtime)
        return _json(
            {
                "status": "fail" if reasons else "pass",
                "reasons": reasons,
                "checks": checks,
                "config_sha256": runtime.loaded.sha256,
            },
            status=503 if reasons else 200,
        )

    return health


def metrics_handler(runtime: Runtime) -> Handler:
    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=runtime.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    return metrics
