"""The request pipeline: the stages in order, as plain calls read top to bottom.

    handle          the boundary: every failure -> the route's error body; counted,
                    timed and logged (one access record, queued) whatever happens
      identify      accept a sane X-Request-ID or make one; trace context; log binding
      route         refuse tricky targets (400); own endpoints; pick the route (404/405)
      authenticate  API key or JWT -> principal (401), allowed route? (403)
      rate_limit    token bucket per principal and overall (429 + Retry-After)
      body_arrived  content type (415); the body, when it came with its head
      read_body     else waited for, within the limit (413, 408); then both check
                    JSON (400) and the schema (422)
      admit         in-flight caps: 503 overloaded (or the fallback) past them
      forward       fallback(breaker(retry(send))), relay the answer

A stage whose feature is off is skipped by a test decided once per config.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

import structlog

from sidecar.config.schema import Config
from sidecar.config.tensors import JSON_HEAD_KEY
from sidecar.http import errors
from sidecar.http.messages import Answer, Response
from sidecar.http.server import ClientGone, Request, RequestRefused
from sidecar.pipeline.auth import Authenticator
from sidecar.pipeline.context import CURRENT_REQUEST, RequestContext, decide_outcome, microseconds
from sidecar.pipeline.forwarding import RoutePath, forward
from sidecar.pipeline.guard import REFUSED_METHODS, check_framing, check_host, check_target
from sidecar.pipeline.identity import (
    accept_request_id,
    accept_traceparent,
    new_ids,
    new_request_id,
)
from sidecar.pipeline.ratelimit import RateLimiter
from sidecar.pipeline.relay import read_body
from sidecar.pipeline.routing import RouteTable
from sidecar.pipeline.validation import RequestValidator, SchemaFailed
from sidecar.telemetry.logwriter import LogWriter
from sidecar.telemetry.metrics import OUTCOME_CLIENT_CLOSED, OUTCOME_ERROR, Metrics
from sidecar.upstream.upstreams import InFlightCount

log: Final = structlog.get_logger("sidecar.pipeline.stages")

OwnHandler = Callable[[Any], Awaitable[Response]]

# Own endpoints that need credentials when they share the main listener.
_PROTECTED_OWN: Final = frozenset({"health", "metrics"})
# What nginx logs for a client that closed before its answer was sent.
CLIENT_CLOSED_STATUS: Final = 499
# Methods whose requests usually have no body: without one, a validated route takes
# them unchecked (a POST without a body is still not JSON).
_BODILESS_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_OWN_ALLOW: Final = "GET, HEAD"  # what the own endpoints (/livez, ...) answer


class Parts(Protocol):
    """What the pipeline uses of one config's runtime (``control.runtime.Runtime``
    provides it; the pipeline never imports the layer that builds it)."""

    @property
    def config(self) -> Config: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def access_log(self) -> LogWriter | None: ...
    @property
    def routes(self) -> RouteTable: ...
    @property
    def paths(self) -> Mapping[str, RoutePath]: ...
    @property
    def authenticator(self) -> Authenticator | None: ...
    @property
    def limiter(self) -> RateLimiter | None: ...
    @property
    def key_names(self) -> frozenset[str]: ...
    @property
    def validators(self) -> Mapping[str, RequestValidator]: ...
    @property
    def requests(self) -> InFlight: ...
    @property
    def in_flight(self) -> InFlightCount: ...


class InFlight:
    """The requests one runtime is handling, counted at the pipeline's boundary: a
    runtime retired by a reload is stopped once none is left. Nothing is signalled
    per request unless a retirement waits (an ``asyncio.Event`` set and cleared
    around every request was a microsecond at one client)."""

    def __init__(self) -> None:
        self.count = 0
        self._none_left: asyncio.Future[None] | None = None

    def leave(self) -> None:
        self.count -= 1
        waiter = self._none_left
        if self.count == 0 and waiter is not None:
            self._none_left = None
            if not waiter.done():
                waiter.set_result(None)

    async def none_left(self) -> None:
        """Return once no request is in flight (a retired runtime takes no new ones)."""
        while self.count:
            waiter = self._none_left
            if waiter is None or waiter.done():
                waiter = self._none_left = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)  # one waiter's timeout is not the others'


class Pipeline:
    """Every stage of one runtime (one config), built once per config."""

    def __init__(self, parts: Parts, own: dict[str, tuple[str, OwnHandler]]) -> None:
        self.config = parts.config
        self.own = own
        self.metrics = parts.metrics
        self.access_log = parts.access_log
        self.routes = parts.routes
        self.paths = parts.paths
        self.authenticator = parts.authenticator
        self.limiter = parts.limiter
        self.key_names = parts.key_names
        self.validators = parts.validators
        self.requests = parts.requests
        self.server_cap = parts.config.server.max_in_flight
        self.body_limits = {
            route.name: parts.config.route_body_limit(route) for route in parts.config.routes
        }
        self.in_flight = parts.in_flight  # proxied requests in flight, all routes together
        # The loop the pipeline serves on, once known: asyncio.get_running_loop() makes
        # a getpid system call each time.
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the boundary ----------------------------------------------------------------

    async def handle(self, request: Request) -> Answer:
        ctx = self.identify(request)
        metrics = self.metrics
        metrics.handling += 1
        requests = self.requests
        requests.count += 1
        status = 500
        try:
            answer = await self.stages(request, ctx)
            status = answer.status
            if isinstance(answer, Response):
                if not ctx.bytes_out:
                    ctx.bytes_out = len(answer.body)
                ctx.stamp(answer.headers)
            return answer
        except errors.SidecarError as exc:
            status, ctx.refused = exc.status, exc.outcome
            return self.error_answer(request, ctx, exc)
        except (ClientGone, asyncio.CancelledError):
            # The client left before its answer was complete: nobody reads an answer.
            status = request.answer_status or CLIENT_CLOSED_STATUS
            ctx.ending = OUTCOME_CLIENT_CLOSED
            raise
        except Exception:
            log.exception("unhandled_error", path=request.path)
            ctx.refused = OUTCOME_ERROR  # a bug of ours: 500
            return self.error_answer(
                request, ctx, errors.InternalError("the sidecar failed to handle this request")
            )
        finally:
            metrics.handling -= 1
            requests.leave()
            ctx.outcome = decide_outcome(ctx, status)
            self.record(request, ctx, status)

    def error_answer(
        self, request: Request, ctx: RequestContext, error: errors.SidecarError
    ) -> Response:
        if request.answer_started:
            raise ClientGone("the answer had started; the connection is cut instead")
        route = ctx.route
        protocol = route.protocol if route is not None else self.routes.unrouted_protocol
        response = errors.error_response(error, ctx.request_id, protocol)
        ctx.stamp(response.headers)
        ctx.bytes_out = len(response.body)
        return response

    def record(self, request: Request, ctx: RequestContext, status: int) -> None:
        """Count and time the request now (a scrape pipelined behind it sees it), and
        queue its access record once the answer is written: the server writes a whole
        answer in the same turn of the loop, so the client does not wait for its
        record to be made (no I/O either way)."""
        duration = time.perf_counter() - ctx.started
        self.metrics.count_request(ctx.route_name, status, ctx.outcome, duration)
        if self.access_log is not None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(_log_access, self.access_log, request, ctx, status, duration)

    # -- the stages, in order --------------------------------------------------------

    async def stages(self, request: Request, ctx: RequestContext) -> Answer:
        own = self.route(request, ctx)
        if own is not None:
            if ctx.own_name in _PROTECTED_OWN and self.authenticator is not None:
                await self.authenticate(request, ctx)
            return await own(request)
        if self.authenticator is not None:
            await self.authenticate(request, ctx)
        if self.limiter is not None:
            await self.rate_limit(ctx)
        # The body first: a slot in flight is taken only by a request that has all of
        # its body, so slow uploaders cannot fill a route while they trickle. Nearly
        # every body comes with its head: then no coroutine is made to wait for it.
        try:
            if not self.body_arrived(request, ctx):
                await self.read_body(request, ctx)
        except SchemaFailed as failed:
            invalid = failed.document
        else:
            return await self.admit(request, ctx)
        # Listing what failed is the slow part: a thread, never the loop. Awaited
        # outside the except clause: compiled code closed while suspended in one
        # leaves its error as the thread's (tests/unit/test_native_exceptions.py).
        validator = self.validators[ctx.route_name]
        raise await asyncio.to_thread(validator.violation, invalid)

    def identify(self, request: Request) -> RequestContext:
        """Accept or make the request id and trace context; bind them to log lines."""
        headers = request.headers
        # The client's id is kept for correlation (answer, upstream, payload log), but
        # clients may reuse one: sidecar_id, ours, is unique in every log line.
        sidecar_id, trace_id, span_id = new_ids()
        request_id = accept_request_id(headers.text(b"x-request-id"), sidecar_id)
        traceparent, trace_id = accept_traceparent(
            headers.text(b"traceparent"), (trace_id, span_id)
        )
        ctx = RequestContext(
            request_id=request_id,
            sidecar_id=sidecar_id,
            traceparent=traceparent,
            trace_id=trace_id,
        )
        CURRENT_REQUEST.set(ctx)  # log lines from here on carry its ids
        return ctx

    def route(self, request: Request, ctx: RequestContext) -> OwnHandler | None:
        """Refuse tricky targets (any path); an own endpoint's handler, or the route."""
        method = request.method
        path = request.path
        try:
            if method in REFUSED_METHODS:
                self.refuse_method(method, path)
            check_target(request.target)
            check_framing(request.headers.get("Transfer-Encoding"))
            check_host(request.headers.count(b"host"), request.version)
        except errors.SidecarError:
            # Answered in the error shape of the route whose path this is (its clients
            # read it); still counted under no route.
            route, path_route = self.routes.match(path, method)
            ctx.route = route or path_route
            raise
        endpoint = self.own.get(path)
        if endpoint is not None:
            if method not in ("GET", "HEAD"):
                raise errors.MethodNotAllowed(
                    f"{path} answers GET only", headers={"Allow": _OWN_ALLOW}
                )
            ctx.own_name, handler = endpoint
            ctx.route_name = "_" + ctx.own_name
            ctx.answered_by = "own"
            return handler
        route, path_route = self.routes.match(path, method)
        if route is None:
            if path_route is not None:
                # Answered in the error shape of the route whose path this is (its
                # clients read it); still counted under no route.
                ctx.route = path_route
                raise errors.MethodNotAllowed(
                    f"method {method} is not allowed here",
                    headers={"Allow": self.routes.allowed(path)},
                )
            raise errors.NoRoute(f"no route for {method} {path}")
        ctx.route = route
        ctx.route_name = name = route.name
        ctx.body_limit = self.body_limits[name]
        return None

    def refuse_method(self, method: str, path: str) -> None:
        """TRACE or CONNECT: a 405 whose Allow (RFC 9110 section 15.5.6) lists what
        the path's own endpoint or routes take. On a path nothing serves (no own
        endpoint, no route: nothing can take the request), it goes on to the answer
        any method gets there: 400 for a target that is not a plain path, else 404."""
        allowed = _OWN_ALLOW if path in self.own else self.routes.allowed(path)
        if allowed:
            raise errors.MethodNotAllowed(
                f"{method} is not accepted by this proxy", headers={"Allow": allowed}
            )

    async def authenticate(self, request: Request, ctx: RequestContext) -> None:
        """401 without valid credentials, 403 for a route the principal may not use (or
        an operator's endpoint without the admin scope). A failed attempt takes a
        token from the global bucket too: a flood of bad keys is rate limited (429)
        like any other traffic."""
        authenticator = self.authenticator
        assert authenticator is not None
        header = authenticator.settings.header
        try:
            principal = authenticator.authenticate(
                request.headers.get("Authorization"),
                request.headers.get(header) if header else None,
            )
        except errors.Unauthorized as exc:
            refused: errors.Unauthorized | None = exc
        else:
            refused = None
        if refused is not None:  # awaited outside the except clause, as above
            if self.limiter is not None:
                await self.limiter.check_failed_auth()
            raise refused
        route = ctx.route
        if route is not None:
            authenticator.authorize(principal, route.name, request.method)
        else:
            authenticator.require_admin(principal, f"read {request.path}")
        ctx.principal = principal.name

    async def rate_limit(self, ctx: RequestContext) -> None:
        """429 past a principal's or the global token bucket (or only counted)."""
        limiter = self.limiter
        assert limiter is not None
        principal = ctx.principal or "anonymous"
        label = principal if principal in self.key_names or principal == "anonymous" else "jwt"
        ctx.extra_fields = await limiter.check(principal, label)

    def body_arrived(self, request: Request, ctx: RequestContext) -> bool:
        """The content type (415); then, when the whole body came with its head,
        the body taken and checked (``check_body``). False: it is still to be read."""
        assert ctx.route is not None
        validator = self.validators.get(ctx.route.name)
        if validator is not None:
            if not request.body_exists and request.method in _BODILESS_METHODS:
                # Nothing to check: a route's metadata or readiness GET has no body.
                validator = None
            else:
                validator.check_content_type(request.content_type, request.body_exists)
        if (
            validator is not None
            and validator.binary_schema
            and validator.checks_in_a_thread(
                request.headers.text(JSON_HEAD_KEY), request.content_length or 0
            )
        ):
            return False  # read_body checks it in a thread
        body = request.arrived_body(ctx.body_limit)
        if body is None:
            return False
        self.check_body(request, ctx, body, validator)
        return True

    async def read_body(self, request: Request, ctx: RequestContext) -> None:
        """The body within the route's limit (413, or 408 when it stalls), checked (in
        a thread when that is long work: ``RequestValidator.checks_in_a_thread``)."""
        assert ctx.route is not None
        body = await read_body(request, ctx.body_limit)
        validator = self.validators.get(ctx.route.name)
        if validator is not None:
            json_head = self.json_head(request, validator)
            if validator.checks_in_a_thread(json_head, len(body)):
                ctx.body = body
                ctx.bytes_in = len(body)
                ctx.document = await asyncio.to_thread(validator.check_body, body, json_head)
                return
        self.check_body(request, ctx, body, validator)

    @staticmethod
    def json_head(request: Request, validator: RequestValidator) -> str | None:
        """Its Inference-Header-Content-Length, on a route that reads binary tensors."""
        return request.headers.text(JSON_HEAD_KEY) if validator.binary_tensors else None

    def check_body(
        self,
        request: Request,
        ctx: RequestContext,
        body: bytes,
        validator: RequestValidator | None,
    ) -> None:
        """JSON (400 invalid_json) and schema (``SchemaFailed``), as the route asks."""
        ctx.body = body
        ctx.bytes_in = len(body)
        if validator is not None:
            ctx.document = validator.check_body(body, self.json_head(request, validator))

    async def admit(self, request: Request, ctx: RequestContext) -> Answer:
        """Load shedding: caps on requests in flight, per route and server-wide.

        Past a cap the request is refused at once (503 overloaded, Retry-After), or,
        when the route's fallback answers overload, forwarded marked as shed (the
        fallback answers). Nothing queues: a request is admitted or answered now.
        """
        assert ctx.route is not None
        path = self.paths[ctx.route.name]
        route_cap = path.route.max_in_flight
        server_cap = self.server_cap
        server, route = self.in_flight, path.in_flight
        server_full = server_cap is not None and server.count >= server_cap
        if server_full or (route_cap is not None and route.count >= route_cap):
            refusal = path.overloaded(server_full)
            if not path.sheds_to_fallback:
                raise refusal
            ctx.shed = refusal
            return await forward(request, ctx, path)
        server.count += 1
        route.count += 1
        try:
            return await forward(request, ctx, path)
        finally:
            server.count -= 1
            route.count -= 1


def _log_access(
    access_log: LogWriter, request: Request, ctx: RequestContext, status: int, duration: float
) -> None:
    access_log.submit(access_record(ctx, request.method, request.path, status, duration))


# The access record's fields, in the order they are written. Each record starts as
# a copy of this (its key table copied whole) and has its values replaced: a dict
# built key by key grew four times and was half of a record's cost.
_ACCESS_FIELDS: Final[dict[str, Any]] = dict.fromkeys(
    (
        "event",
        "timestamp",
        "request_id",
        "sidecar_id",
        "trace_id",
        "route",
        "method",
        "path",
        "status",
        "outcome",
        "duration_ms",
        "upstream_ms",
        "attempts",
        "breaker",
        "fallback",
        "principal",
        "bytes_in",
        "bytes_out",
    )
)


def access_record(
    ctx: RequestContext, method: str, path: str, status: int, duration: float
) -> dict[str, Any]:
    """One request's access-log line: the same fields for every request, refused
    ones included."""
    record = _ACCESS_FIELDS.copy()
    record["event"] = "request"
    record["timestamp"] = time.time()
    record["request_id"] = ctx.request_id
    record["sidecar_id"] = ctx.sidecar_id
    record["trace_id"] = ctx.trace_id or None
    record["route"] = ctx.route_name
    record["method"] = method
    record["path"] = path
    record["status"] = status
    record["outcome"] = ctx.outcome
    record["duration_ms"] = _milliseconds(duration)
    upstream = ctx.upstream_seconds
    if upstream is not None:
        record["upstream_ms"] = _milliseconds(upstream)
    record["attempts"] = ctx.attempts
    record["breaker"] = ctx.breaker_state
    record["fallback"] = ctx.fallback_rule
    record["principal"] = ctx.principal
    record["bytes_in"] = ctx.bytes_in
    record["bytes_out"] = ctx.bytes_out
    return record


def _milliseconds(seconds: float) -> float:
    """As ``round(ms, 3)``, whose decimal conversion was a fifth of a record's cost."""
    return microseconds(seconds) / 1000.0


def refusal_answer(
    parts: Parts, refusal: RequestRefused, method: str, target: str, peer: str
) -> Response:
    """The answer to a request the HTTP layer refused before the pipeline saw it (a
    malformed or oversized head, a stalled one): our JSON error, counted in metrics
    and the access log like every other refusal."""
    error = errors.from_refusal(refusal)
    request_id = new_request_id()
    path = target.split("?", 1)[0]
    # In the error shape of the route whose path the target names, when the head got
    # that far (its clients read it); still counted under no route.
    route, path_route = parts.routes.match(path, method)
    shape = route or path_route
    response = errors.error_response(
        error,
        request_id,
        shape.protocol if shape is not None else parts.routes.unrouted_protocol,
    )
    ctx = RequestContext(request_id=request_id, sidecar_id=request_id, traceparent="", trace_id="")
    ctx.outcome = error.outcome
    ctx.bytes_out = len(response.body)
    parts.metrics.count_request(ctx.route_name, error.status, error.outcome, 0.0)
    access_log = parts.access_log
    if access_log is not None:
        record = access_record(ctx, method, path[:200], error.status, 0.0)
        record["error"] = error.type
        access_log.submit(record)
    return response
