"""The request pipeline, in one place, read top to bottom.

    boundary        every own error -> JSON error body, never a stack trace
    identity        accept a sane X-Request-ID or make one; trace context; log binding
    observe         count and time every request; queue its access-log record
    routing         refuse tricky targets (400); pick the configured route (404/405)
    auth            API key or JWT -> principal (401), allowed route? (403)
    rate limit      token bucket per principal and overall (429 + Retry-After)
    admission       in-flight caps: 503 overloaded (or the fallback) past them
    body            read within the limit (413); content type (415); JSON (400);
                    schema (422)
    handler         forward = fallback(breaker(retry(send))), relay the answer

Nobody adds a middleware anywhere else.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar import admin, middlewares
from sidecar.context import REQUEST_CONTEXT
from sidecar.forwarding import forward
from sidecar.runtime import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("sidecar_runtime", Runtime)


def pipeline(runtime: Runtime) -> list[Middleware]:
    """The stages in order. A stage whose feature is off is left out, not skipped."""
    config = runtime.config
    stages = [
        middlewares.error_boundary(),
        middlewares.request_identity(),
        middlewares.observe(metrics=runtime.metrics, access_log=runtime.logs.access),
        middlewares.routing(routes=runtime.routes, config=config),
    ]
    if runtime.authenticator is not None:
        stages.append(middlewares.authentication(authenticator=runtime.authenticator))
    if runtime.limiter is not None:
        stages.append(
            middlewares.rate_limiting(limiter=runtime.limiter, key_names=runtime.key_names)
        )
    stages += [
        middlewares.admission(runtime=runtime),
        middlewares.request_body(runtime=runtime),
    ]
    return stages


def _proxy_handler(runtime: Runtime) -> Handler:
    paths = runtime.paths

    async def proxy(request: web.Request) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        assert ctx.route is not None  # set by the routing stage
        return await forward(request, ctx, paths[ctx.route.name])

    return proxy


def build_main_app(runtime: Runtime) -> web.Application:
    """The listener clients and Kubernetes talk to."""
    app = web.Application(middlewares=pipeline(runtime))
    app[RUNTIME] = runtime
    app.router.add_get("/livez", admin.livez_handler(runtime), name="livez")
    app.router.add_get("/readyz", admin.readyz_handler(runtime), name="readyz")
    if not runtime.config.admin.enabled:
        # Without an admin listener the detailed endpoints live here; with one, these
        # paths reach the model server (whose own /metrics may matter to its owners).
        app.router.add_get("/health", admin.health_handler(runtime), name="health")
        app.router.add_get("/metrics", admin.metrics_handler(runtime), name="metrics")
    app.router.add_route(
        "*", "/{tail:.*}", _proxy_handler(runtime), name=middlewares.PROXY_ROUTE_NAME
    )
    return app


def build_admin_app(runtime: Runtime) -> web.Application:
    """The operator's listener (loopback by default): health detail and metrics."""
    app = web.Application(
        middlewares=[
            middlewares.error_boundary(),
            middlewares.request_identity(),
        ]
    )
    app[RUNTIME] = runtime
    app.router.add_get("/livez", admin.livez_handler(runtime), name="livez")
    app.router.add_get("/readyz", admin.readyz_handler(runtime), name="readyz")
    app.router.add_get("/health", admin.health_handler(runtime), name="health")
    app.router.add_get("/metrics", admin.metrics_handler(runtime), name="metrics")
    return app
