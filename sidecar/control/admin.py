"""The sidecar's own endpoints. They are never forwarded to the model server."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from sidecar.control.health import verdict
from sidecar.control.runtime import Runtime
from sidecar.http import errors
from sidecar.http.messages import Response
from sidecar.telemetry.metrics import CONTENT_TYPE

CurrentRuntime = Callable[[], Runtime]
Reload = Callable[[], Awaitable[dict[str, Any]]]
# Served on the main listener and on the admin one: a handler
# reads only the request's headers, which both kinds of request have.
Handler = Callable[[Any], Awaitable[Response]]


def current_handler(current: CurrentRuntime, make: Callable[[Runtime], Handler]) -> Handler:
    """A handler that always serves from the runtime in service, across reloads."""
    built: list[tuple[Runtime, Handler]] = []

    async def handle(request: Any) -> Response:
        runtime = current()
        if not built or built[0][0] is not runtime:
            built[:] = [(runtime, make(runtime))]
        return await built[0][1](request)

    return handle


def reload_handler(current: CurrentRuntime, reload: Reload, *, open_to_all: bool) -> Handler:
    """``POST /-/reload``. On a listener others can reach (not loopback), only a
    principal with the ``admin`` scope may reload: a credential, not an address."""

    async def do_reload(request: Any) -> Response:
        if not open_to_all:
            authenticator = current().authenticator
            if authenticator is None:
                raise errors.Forbidden(
                    "reload over HTTP needs an admin credential, and auth is off; use SIGHUP"
                )
            header = authenticator.settings.header
            principal = authenticator.authenticate(
                request.headers.get("Authorization"),
                request.headers.get(header) if header else None,
            )
            authenticator.require_admin(principal, "reload the config")
        result = await reload()
        status = {"ok": 200, "ignored": 503}.get(result["result"], 400)  # 503: draining
        return _json(result, status=status)

    return do_reload


def _json(payload: object, status: int = 200) -> Response:
    return Response(status, orjson.dumps(payload), content_type="application/json")


def livez_handler(runtime: Runtime) -> Handler:
    async def livez(request: Any) -> Response:
        # Answering at all proves the process and its event loop are alive.
        return _json({"status": "alive"})

    return livez


def readyz_handler(runtime: Runtime, *, detail: bool = True) -> Handler:
    """Ready or not, from cached state only: a probe storm from Kubernetes never turns
    into calls to the model. With ``detail`` (the admin listener) the reasons too;
    the public listener tells clients nothing about upstream names, addresses or
    errors."""

    async def readyz(request: Any) -> Response:
        result = verdict(runtime, runtime.logs, runtime.loop_lag)
        body: dict[str, Any] = {"status": "ready" if result.ready else "not_ready"}
        if detail:
            if result.status == "degraded":
                body["degraded"] = True
            if result.reasons:
                body["reasons"] = result.reasons
        return _json(body, status=200 if result.ready else 503)

    return readyz


def public_readyz_handler(runtime: Runtime) -> Handler:
    return readyz_handler(runtime, detail=False)


def health_handler(runtime: Runtime) -> Handler:
    async def health(request: Any) -> Response:
        result = verdict(runtime, runtime.logs, runtime.loop_lag)
        return _json(
            {
                "status": result.status,
                "ready": result.ready,
                "reasons": result.reasons,
                "checks": result.checks,
                "config_sha256": runtime.loaded.sha256,
                "pid": os.getpid(),  # which worker answered, when there are several
            },
            status=200 if result.ready else 503,
        )

    return health


def metrics_handler(runtime: Runtime) -> Handler:
    async def metrics(request: Any) -> Response:
        return Response(200, runtime.metrics.render(), content_type=CONTENT_TYPE)

    return metrics
