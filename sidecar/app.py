"""The request pipeline, in one place, read top to bottom.

    boundary        every own error -> JSON error body, never a stack trace
    identity        accept a sane X-Request-ID or make one; trace context; log binding
    observe         count and time every request; queue its access-log record
    routing         refuse tricky targets (400); pick the configured route (404/405)
    auth            API key or JWT -> principal (401), allowed route? (403)
    rate limit      token bucket per principal and overall (429 + Retry-After)
    body            read within the limit (413); content type (415); JSON (400);
                    schema (422)
    admission       in-flight caps: 503 overloaded (or the fallback) past them
    handler         forward = fallback(breaker(retry(send))), relay the answer

Nobody adds a middleware anywhere else.
"""

from __future__ import annotations

import functools

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar import admin, middlewares
from sidecar.context import REQUEST_CONTEXT
from sidecar.forwarding import forward
from sidecar.runtime import Runtime


def pipeline(runtime: Runtime) -> list[Middleware]:
    """The stages in order. A stage whose feature is off is left out, not skipped."""
    stages = [
        middlewares.error_boundary(),
        middlewares.request_identity(),
        middlewares.observe(metrics=runtime.metrics, access_log=runtime.logs.access),
        middlewares.routing(runtime=runtime, own=own_endpoints(runtime)),
    ]
    if runtime.authenticator is not None:
        stages.append(
            middlewares.authentication(authenticator=runtime.authenticator, limiter=runtime.limiter)
        )
    if runtime.limiter is not None:
        stages.append(
            middlewares.rate_limiting(limiter=runtime.limiter, key_names=runtime.key_names)
        )
    stages += [
        # The body first: a slot in flight is taken only by a request that has all of
        # its body, so slow uploaders cannot fill a route while they trickle.
        middlewares.request_body(runtime=runtime),
        middlewares.admission(runtime=runtime),
    ]
    return stages


def own_endpoints(runtime: Runtime) -> dict[str, tuple[str, Handler]]:
    """Paths the main listener answers itself (never forwarded), by exact path."""
    endpoints = {
        "/livez": ("livez", admin.livez_handler(runtime)),
        "/readyz": ("readyz", admin.public_readyz_handler(runtime)),
    }
    if not runtime.config.admin.enabled:
        # Without an admin listener the detailed endpoints live here; with one, these
        # paths reach the model server (whose own /metrics may matter to its owners).
        endpoints["/health"] = ("health", admin.health_handler(runtime))
        endpoints["/metrics"] = ("metrics", admin.metrics_handler(runtime))
    return endpoints


def build_handler(runtime: Runtime) -> Handler:
    """The whole pipeline of one runtime as a single handler (built once per config)."""
    paths = runtime.paths

    async def endpoint(request: web.Request) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        if ctx.own_handler is not None:
            own: Handler = ctx.own_handler
            return await own(request)
        assert ctx.route is not None  # set by the routing stage
        return await forward(request, ctx, paths[ctx.route.name])

    handler: Handler = endpoint
    for stage in reversed(pipeline(runtime)):
        handler = functools.partial(stage, handler=handler)
    return handler


def build_admin_app(
    current: admin.CurrentRuntime,
    reload: admin.Reload | None = None,
    *,
    reload_open_to_all: bool = True,
) -> web.Application:
    """The operator's listener (loopback by default): health detail, metrics, reload."""
    app = web.Application(
        middlewares=[
            middlewares.error_boundary(),
            middlewares.request_identity(),
        ]
    )
    app.router.add_get("/livez", admin.current_handler(current, admin.livez_handler))
    app.router.add_get("/readyz", admin.current_handler(current, admin.readyz_handler))
    app.router.add_get("/health", admin.current_handler(current, admin.health_handler))
    app.router.add_get("/metrics", admin.current_handler(current, admin.metrics_handler))
    if reload is not None:
        app.router.add_post(
            "/-/reload",
            admin.reload_handler(current, reload, open_to_all=reload_open_to_all),
        )
    return app
