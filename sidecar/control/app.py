"""What each listener serves.

The main listener runs the request pipeline (``sidecar.pipeline.stages``) on the
sidecar's own HTTP server; the operator's listener (admin: health detail, metrics,
reload) is a small aiohttp application, off the hot path.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler as AiohttpHandler

from sidecar.control import admin
from sidecar.control.listener import to_aiohttp
from sidecar.control.runtime import Runtime
from sidecar.http import errors
from sidecar.pipeline.identity import accept_request_id, new_request_id
from sidecar.pipeline.stages import OwnHandler, Pipeline

log = structlog.get_logger("sidecar.control.app")


def own_endpoints(runtime: Runtime) -> dict[str, tuple[str, OwnHandler]]:
    """Paths the main listener answers itself (never forwarded), by exact path."""
    endpoints: dict[str, tuple[str, OwnHandler]] = {
        "/livez": ("livez", admin.livez_handler(runtime)),
        "/readyz": ("readyz", admin.public_readyz_handler(runtime)),
    }
    if not runtime.config.admin.enabled:
        # Without an admin listener the detailed endpoints live here; with one, these
        # paths reach the model server (whose own /metrics may matter to its owners).
        endpoints["/health"] = ("health", admin.health_handler(runtime))
        endpoints["/metrics"] = ("metrics", admin.metrics_handler(runtime))
    return endpoints


def build_pipeline(runtime: Runtime) -> Pipeline:
    """The whole pipeline of one runtime (built once per config)."""
    return Pipeline(runtime, own_endpoints(runtime))


def _serve_with_aiohttp(handler: OwnHandler) -> AiohttpHandler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return to_aiohttp(await handler(request))

    return handle


@web.middleware
async def _admin_boundary(request: web.Request, handler: AiohttpHandler) -> web.StreamResponse:
    """Every failure on the admin listener becomes the JSON error body too."""
    request_id = accept_request_id(request.headers.get("X-Request-ID"), new_request_id())
    try:
        response = await handler(request)
    except errors.SidecarError as exc:
        error: errors.SidecarError = exc
    except web.HTTPException as exc:
        kind = {404: errors.NoRoute, 405: errors.MethodNotAllowed}.get(
            exc.status, errors.BadRequest if exc.status < 500 else errors.InternalError
        )
        error = kind(exc.reason or "request refused")
    except Exception:
        log.exception("unhandled_admin_error", path=request.path)
        error = errors.InternalError("the sidecar failed to handle this request")
    else:
        response.headers["X-Request-ID"] = request_id
        return response
    return to_aiohttp(errors.error_response(error, request_id))


def build_admin_app(
    current: admin.CurrentRuntime,
    reload: admin.Reload | None = None,
    *,
    reload_open_to_all: bool = True,
) -> web.Application:
    """The operator's listener (loopback by default): health detail, metrics, reload."""
    app = web.Application(middlewares=[_admin_boundary])

    def add(path: str, make: Any) -> None:
        app.router.add_get(path, _serve_with_aiohttp(admin.current_handler(current, make)))

    add("/livez", admin.livez_handler)
    add("/readyz", admin.readyz_handler)
    add("/health", admin.health_handler)
    add("/metrics", admin.metrics_handler)
    if reload is not None:
        app.router.add_post(
            "/-/reload",
            _serve_with_aiohttp(
                admin.reload_handler(current, reload, open_to_all=reload_open_to_all)
            ),
        )
    return app
