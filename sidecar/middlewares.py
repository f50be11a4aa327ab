"""The generic stages of the request pipeline. Their order is set in ``sidecar.app``.

Each factory takes keyword-only settings and returns an aiohttp middleware. A stage
that refuses a request raises a ``SidecarError``; only the boundary builds error
responses.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from sidecar import errors
from sidecar.auth import Authenticator
from sidecar.context import CURRENT_REQUEST, REQUEST_CONTEXT, RequestContext
from sidecar.guard import REFUSED_METHODS, check_framing, check_target
from sidecar.identity import accept_request_id, accept_traceparent, new_request_id
from sidecar.logwriter import LogWriter
from sidecar.metrics import OUTCOME_ERROR, OUTCOME_OWN, Metrics
from sidecar.proxy import read_body
from sidecar.ratelimit import RateLimiter
from sidecar.runtime import Runtime
from sidecar.validation import SchemaFailed

log = structlog.get_logger("sidecar.pipeline")


def error_boundary() -> Middleware:
    """Outermost: every failure becomes the JSON error body, never a stack trace."""

    @web.middleware
    async def boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.SidecarError as exc:
            error = exc
        except web.HTTPException as exc:
            # Raised by aiohttp itself (e.g. a malformed request it refused).
            error = _from_aiohttp(exc)
        except Exception:
            log.exception("unhandled_error", path=request.path)
            error = errors.InternalError("the sidecar failed to handle this request")
        ctx = request.get(REQUEST_CONTEXT)
        protocol = ctx.route.protocol if ctx is not None and ctx.route is not None else "plain"
        response = errors.error_response(
            error, ctx.request_id if ctx else new_request_id(), protocol
        )
        if ctx is not None:
            ctx.stamp(response.headers)
        if error.close_connection:
            # The body was left unread: send the answer, then close at once rather
            # than let aiohttp drain (read) the rest of the body first.
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
        return response

    return boundary


def _from_aiohttp(exc: web.HTTPException) -> errors.SidecarError:
    by_status: dict[int, type[errors.SidecarError]] = {
        404: errors.NoRoute,
        405: errors.MethodNotAllowed,
        413: errors.BodyTooLarge,
        415: errors.UnsupportedMediaType,
    }
    fallback = errors.BadRequest if exc.status < 500 else errors.InternalError
    kind = by_status.get(exc.status, fallback)
    return kind(exc.reason or "request refused")


def request_identity() -> Middleware:
    """Accept or make the request id and trace context; bind them to every log line."""

    @web.middleware
    async def identity(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        # The client's id is kept for correlation (answer, upstream, payload log), but
        # clients may reuse one: sidecar_id, ours, is unique in every log line.
        sidecar_id = new_request_id()
        request_id = accept_request_id(headers.get("X-Request-ID"), sidecar_id)
        traceparent, trace_id = accept_traceparent(headers.get("traceparent"))
        ctx = RequestContext(
            request_id=request_id,
            sidecar_id=sidecar_id,
            traceparent=traceparent,
            trace_id=trace_id,
        )
        request[REQUEST_CONTEXT] = ctx
        CURRENT_REQUEST.set(ctx)  # log lines from here on carry its ids
        response = await handler(request)
        if not response.prepared:
            ctx.stamp(response.headers)
        return response

    return identity


def observe(*, metrics: Metrics, access_log: LogWriter | None) -> Middleware:
    """Count and time every request (errors included) and queue its access record."""

    @web.middleware
    async def observer(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        metrics.in_flight.inc()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            if not ctx.bytes_out and isinstance(response, web.Response):
                body = response.body
                ctx.bytes_out = len(body) if isinstance(body, bytes) else 0
            return response
        except errors.SidecarError as exc:
            status, ctx.outcome = exc.status, exc.outcome
            raise
        except Exception:
            ctx.outcome = OUTCOME_ERROR  # a bug of ours: the boundary answers 500
            raise
        finally:
            duration = time.perf_counter() - ctx.started
            metrics.in_flight.dec()
            metrics.count_request(ctx.route_name, status, ctx.outcome, duration)
            if access_log is not None:
                # A dict into a bounded queue; rendering and I/O happen in the writer.
                access_log.submit(
                    {
                        "event": "request",
                        "timestamp": time.time(),
                        "request_id": ctx.request_id,
                        "sidecar_id": ctx.sidecar_id,
                        "trace_id": ctx.trace_id,
                        "route": ctx.route_name,
                        "method": request.method,
                        "path": request.path,
                        "status": status,
                        "outcome": ctx.outcome,
                        "duration_ms": round(duration * 1000.0, 3),
                        "upstream_ms": (
                            None
                            if ctx.upstream_seconds is None
                            else round(ctx.upstream_seconds * 1000.0, 3)
                        ),
                        "attempts": ctx.attempts,
                        "breaker": ctx.breaker_state,
                        "fallback": ctx.fallback_rule,
                        "principal": ctx.principal,
                        "bytes_in": ctx.bytes_in,
                        "bytes_out": ctx.bytes_out,
                    }
                )

    return observer


def routing(*, runtime: Runtime, own: dict[str, tuple[str, Handler]]) -> Middleware:
    """Refuse tricky targets (any path), answer own endpoints, else pick the route
    (404/405)."""
    routes = runtime.routes
    config = runtime.config

    @web.middleware
    async def router(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        if request.method in REFUSED_METHODS:
            raise errors.MethodNotAllowed(f"{request.method} is not accepted by this proxy")
        check_target(request.raw_path)
        check_framing(request.headers.get("Transfer-Encoding"))
        endpoint = own.get(request.path)
        if endpoint is not None:
            if request.method not in ("GET", "HEAD"):
                raise errors.MethodNotAllowed(f"{request.path} answers GET only")
            ctx.own_name, ctx.own_handler = endpoint
            ctx.route_name = "_" + ctx.own_name
            ctx.outcome = OUTCOME_OWN
            return await handler(request)
        route, path_matched = routes.match(request.path, request.method)
        if route is None:
            if path_matched:
                raise errors.MethodNotAllowed(f"method {request.method} is not allowed here")
            raise errors.NoRoute(f"no route for {request.method} {request.path}")
        ctx.route = route
        ctx.route_name = route.name
        ctx.body_limit = config.route_body_limit(route)
        return await handler(request)

    return router


def admission(*, runtime: Runtime) -> Middleware:
    """Load shedding: caps on requests in flight, per route and server-wide.

    Past a cap the request is refused at once (503 overloaded, Retry-After), or,
    when the route's fallback answers overload, handed on marked as shed. Nothing
    queues: a request is either admitted or answered now.
    """
    server_cap = runtime.config.server.max_in_flight

    @web.middleware
    async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        if ctx.route is None:
            return await handler(request)
        path = runtime.paths[ctx.route.name]
        route_cap = path.route.max_in_flight
        if (server_cap is not None and runtime.in_flight >= server_cap) or (
            route_cap is not None and path.in_flight >= route_cap
        ):
            if not path.sheds_to_fallback:
                raise path.overloaded()
            ctx.shed = True
            return await handler(request)
        runtime.in_flight += 1
        path.in_flight += 1
        try:
            return await handler(request)
        finally:
            runtime.in_flight -= 1
            path.in_flight -= 1

    return admit


# Own endpoints that need credentials when they share the main listener.
_PROTECTED_OWN = frozenset({"health", "metrics"})


def authentication(*, authenticator: Authenticator, limiter: RateLimiter | None) -> Middleware:
    """401 without valid credentials, 403 for a route the principal may not use (or
    an operator's endpoint without the admin scope). A failed attempt takes a token
    from the global bucket too: a flood of bad keys is rate limited (429) like
    any other traffic."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        route = ctx.route
        if route is None and ctx.own_name not in _PROTECTED_OWN:
            return await handler(request)  # /livez and /readyz stay open
        header = authenticator.settings.header
        try:
            principal = authenticator.authenticate(
                request.headers.get("Authorization"),
                request.headers.get(header) if header else None,
            )
        except errors.Unauthorized:
            if limiter is not None:
                await limiter.check_failed_auth()
            raise
        if route is not None:
            authenticator.authorize(principal, route.name, request.method)
        else:
            authenticator.require_admin(principal, f"read {request.path}")
        ctx.principal = principal.name
        return await handler(request)

    return authenticate


def rate_limiting(*, limiter: RateLimiter, key_names: frozenset[str]) -> Middleware:
    """429 past a principal's or the global token bucket (or only counted: report-only)."""

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        if ctx.route is None:
            return await handler(request)
        principal = ctx.principal or "anonymous"
        label = principal if principal in key_names or principal == "anonymous" else "jwt"
        headers = await limiter.check(principal, label)
        if headers:
            ctx.extra_headers = headers
        return await handler(request)

    return limit


def request_body(*, runtime: Runtime) -> Middleware:
    """Read the body within the route's limit (413), then its content type (415),
    JSON (400 invalid_json) and schema (422), as the route asks."""

    @web.middleware
    async def body(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        if ctx.route is None:
            return await handler(request)
        validator = runtime.validators.get(ctx.route.name)
        if validator is not None:
            validator.check_content_type(request.content_type, request.body_exists)
        ctx.body = await read_body(request, ctx.body_limit)
        ctx.bytes_in = len(ctx.body)
        if validator is not None:
            try:
                ctx.document = validator.check_body(ctx.body)
            except SchemaFailed as failed:
                # Listing what failed is the slow part: a thread, never the loop.
                raise await asyncio.to_thread(validator.violation, failed.document) from None
        return await handler(request)

    return body
