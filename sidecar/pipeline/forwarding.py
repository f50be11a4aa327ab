"""The upstream path of one route, composed of plain async steps:

    forward = fallback( breaker( retry( send ) ) )

* retry: connect errors, per-try timeouts and configured statuses are retried on
  routes marked ``retryable``, with full-jitter backoff, ``Retry-After`` honoured,
  inside the route's total deadline and the upstream's retry budget. Nothing is
  retried once a byte of the answer has gone to the client: retries happen before
  the answer is relayed.
* breaker: one per upstream; open means the upstream is not called at all.
* fallback: when a configured trigger fires (circuit_open, upstream_error, timeout,
  overloaded) the route's chain may answer instead; otherwise the original error
  (or the model's own 5xx answer) goes to the client.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from sidecar.analytics.drift import DriftMonitor
from sidecar.analytics.sampling import sampled
from sidecar.config.schema import Route
from sidecar.config.tensors import JSON_HEAD_KEY, json_head_length
from sidecar.http import errors
from sidecar.http.client import BrokenAnswer, ClientResponse
from sidecar.http.messages import Answer, Headers, Response
from sidecar.http.server import Request
from sidecar.pipeline.context import RequestContext
from sidecar.pipeline.relay import (
    BUFFER_RESPONSE_LIMIT,
    client_response_headers,
    relay,
    upstream_request_headers,
)
from sidecar.telemetry.logs import JSON_HEADS
from sidecar.telemetry.logwriter import LogWriter
from sidecar.telemetry.metrics import OUTCOME_ABORTED, Metrics
from sidecar.upstream.breaker import BreakerFailure, UpstreamBreaker
from sidecar.upstream.fallback import (
    FALLBACK_HEADER,
    FallbackChain,
    SecondaryAnswer,
    keeps,
)
from sidecar.upstream.retry import RetryBudget, backoff_delay, parse_retry_after
from sidecar.upstream.shadow import PrimaryOutcome, ShadowMirror, StreamCapture
from sidecar.upstream.upstreams import IDEMPOTENT, InFlightCount, UpstreamCall, UpstreamClient

log: Final = structlog.get_logger("sidecar.pipeline.forwarding")

_CONNECTION: Final = frozenset({b"connection"})
_AUTHORIZATION: Final = b"authorization"

# Error bodies up to this size are read before a retry so the connection is reused.
_DRAIN_LIMIT: Final = 64 * 1024


@dataclass(slots=True)
class ModelFailed:
    """The model answered, but with a 5xx: a failure for the breaker, still an answer."""

    response: ClientResponse


@dataclass(slots=True)
class UpstreamGuard:
    """Per-upstream protection shared by every route that uses the upstream."""

    breaker: UpstreamBreaker | None
    budget: RetryBudget


@dataclass(slots=True)
class RoutePath:
    """Everything one route needs to forward a request, built once per config."""

    route: Route
    upstream: UpstreamClient
    guard: UpstreamGuard
    fallback: FallbackChain | None
    metrics: Metrics
    overload_retry_after: float
    rng: random.Random = field(default_factory=random.Random)
    in_flight: InFlightCount = field(default_factory=InFlightCount)
    drift: DriftMonitor | None = None
    shadow: ShadowMirror | None = None
    payload_log: LogWriter | None = None
    credentials: frozenset[bytes] = frozenset()  # the sidecar's own, never forwarded
    # Read from the config once: a config model's attribute costs a Python-level
    # lookup, and each request reads these.
    timeout: float = field(init=False)  # the whole deadline, every attempt included
    per_try_timeout: float = field(init=False)
    connect_timeout: float | None = field(init=False)
    retryable: bool = field(init=False)  # the route's requests may be sent again
    idle_timeout: float = field(init=False)
    failure_statuses: frozenset[int] = field(init=False)  # the model is unavailable
    retry_statuses: frozenset[int] = field(init=False)
    max_attempts: int = field(init=False)  # 1 on a route that is not retried

    def __post_init__(self) -> None:
        route = self.route
        self.timeout = route.timeout
        self.per_try_timeout = route.per_try_timeout or route.timeout
        self.connect_timeout = route.connect_timeout
        self.retryable = route.retryable
        self.idle_timeout = route.idle_timeout or self.upstream.config.read_timeout
        self.failure_statuses = frozenset(self.upstream.config.breaker.failure_statuses)
        self.retry_statuses = frozenset(route.retry.on_statuses)
        self.max_attempts = route.retry.attempts if route.retryable else 1

    def falls_back_on(self, status: int) -> bool:
        """A model's answer with this status is replaced by the fallback."""
        fallback = self.fallback
        return (
            fallback is not None
            and "upstream_error" in fallback.triggers
            and status in fallback.statuses
        )

    @property
    def sheds_to_fallback(self) -> bool:
        return self.fallback is not None and "overloaded" in self.fallback.triggers

    def overloaded(self, server_wide: bool) -> errors.Overloaded:
        """The refusal past an in-flight cap, naming the cap: the server's
        (``server.max_in_flight``, all routes together) or this route's own."""
        if server_wide:
            message = "too many requests in flight on this server (server.max_in_flight)"
        else:
            message = (
                f"too many requests in flight for route {self.route.name!r} (its max_in_flight)"
            )
        return errors.Overloaded(
            message, headers={"Retry-After": str(max(1, round(self.overload_retry_after)))}
        )


def _trigger(cause: object) -> str:
    if isinstance(cause, errors.CircuitOpen):
        return "circuit_open"
    if isinstance(cause, errors.Overloaded):
        return "overloaded"
    if isinstance(cause, errors.UpstreamTimeout):
        return "timeout"
    return "upstream_error"


async def _discard(response: ClientResponse, idle: float) -> None:
    """Drop an answer we will not relay, keeping the connection when that is cheap."""
    length = response.content_length
    try:
        if length is not None and length <= _DRAIN_LIMIT:
            async with asyncio.timeout(idle):
                await response.read()
    except (BrokenAnswer, TimeoutError):
        pass  # a broken body: release() below closes the connection
    finally:
        # Released whatever happens, a cancelled request too: read whole it goes back
        # to the pool, else it is closed and its slot freed.
        response.release()


async def _with_retries(
    path: RoutePath, ctx: RequestContext, call: UpstreamCall, probe: bool
) -> ClientResponse:
    """Attempts until an answer worth relaying. Raises ``BreakerFailure`` when the
    upstream was unavailable: a connect error, a timeout, or a status the breaker
    counts (502, 503, 504 by default). Any other answer, a 500 or a 4xx for input the
    model rejected, is the model's answer and is returned (after retries, when the
    route retries its status)."""
    route, upstream, budget = path.route, path.upstream, path.guard.budget
    unavailable = path.failure_statuses
    # A half-open probe asks one question: is the model back? It is never retried.
    max_attempts = 1 if probe else path.max_attempts
    # Sent again on a fresh connection when a kept-alive one failed before answering:
    # only what may be replayed (an idempotent method, or a route marked retryable).
    replayable = path.retryable or call.method in IDEMPOTENT
    connect_timeout = path.connect_timeout
    loop = upstream.pool.loop  # looked up once per pool (each lookup is a getpid())
    started_at = loop.time()
    deadline = started_at + path.timeout
    budget.active_requests += 1
    holding_retry = False
    try:
        attempt = 0
        while True:
            attempt += 1
            # The first attempt has the whole deadline (one clock read fewer).
            remaining = path.timeout if attempt == 1 else deadline - loop.time()
            timeout = min(path.per_try_timeout, remaining)
            ctx.attempts += 1
            started = time.perf_counter()
            ctx.upstream_started = started
            ctx.attempt_limit = timeout
            failure: errors.SidecarError | ModelFailed
            retry_after: float | None = None
            try:
                response = await upstream.send(
                    call,
                    within=timeout,
                    connect_timeout=connect_timeout,
                    replayable=replayable,
                )
            except errors.SidecarError as exc:
                if isinstance(exc, errors.Reloaded):
                    # Not the model failing: no breaker failure, no fallback. A retry's
                    # request did reach the model before: the message must not say
                    # it never did.
                    if attempt > 1:
                        raise errors.Reloaded(
                            "the sidecar's config was reloaded during this request, which "
                            "outlasted the old config's drain time (server.drain_timeout): "
                            f"upstream {upstream.name!r} was tried {attempt - 1} time(s) "
                            "without an answer, and the retry was not sent; send it again"
                        ) from None
                    raise
                failure = exc
                retryable = exc.retryable
            else:
                path.metrics.observe_upstream(upstream.name, time.perf_counter() - started)
                retryable = response.status in path.retry_statuses
                if not retryable and response.status not in unavailable:
                    return response
                failure = ModelFailed(response)
                retry_after = parse_retry_after(response.headers.get("Retry-After"))

            give_up = not retryable or attempt >= max_attempts
            delay = 0.0
            if not give_up:
                delay = max(backoff_delay(route.retry, attempt, path.rng), retry_after or 0.0)
                give_up = loop.time() + delay >= deadline
            if holding_retry:
                budget.release()
                holding_retry = False
            if not give_up and not budget.try_acquire():
                path.metrics.retry_budget_exhausted.labels(upstream.name).inc()
                give_up = True
            if give_up:
                if isinstance(failure, ModelFailed):
                    if failure.response.status not in unavailable:
                        return failure.response  # the model's own answer, retried
                elif isinstance(failure, errors.UpstreamTimeout):
                    failure = _timed_out(path, attempt, loop.time() - started_at)
                raise BreakerFailure(failure)
            holding_retry = True
            path.metrics.retries.labels(upstream.name, _retry_reason(failure)).inc()
            if isinstance(failure, ModelFailed):
                await _discard(failure.response, path.idle_timeout)
            await asyncio.sleep(delay)
    finally:
        budget.active_requests -= 1
        if holding_retry:
            budget.release()


def _read_whole_first(request: Request, response: ClientResponse) -> bool:
    """The answer is one relay reads whole before sending (a small one with a
    Content-Length) and its body has not all arrived with its head."""
    if response.complete:
        return False
    length = response.content_length
    return (
        length is not None
        and length <= BUFFER_RESPONSE_LIMIT
        and request.method != "HEAD"
        and not response.event_stream
    )


async def _arrive_whole(path: RoutePath, ctx: RequestContext, response: ClientResponse) -> None:
    """Wait for the rest of such an answer inside the breaker's block: a model that
    breaks off or goes silent in a body nobody has seen yet is unavailable, as one
    silent before its head is (``BreakerFailure``; the fallback may answer). The
    attempt's time limit (``per_try_timeout``, or what was left of the route's
    ``timeout`` when less) covers the whole of it: a model that trickles a few bytes
    each ``idle_timeout`` must not hold the request (or a half-open breaker's one
    probe) for as long as it likes."""
    name = path.upstream.name
    started = ctx.upstream_started
    limit = ctx.attempt_limit or path.per_try_timeout
    spent = 0.0 if started is None else time.perf_counter() - started
    silent = False
    try:
        async with asyncio.timeout(max(limit - spent, 0.0)):
            try:
                await response.wait_complete(path.idle_timeout)
            except TimeoutError:
                silent = True
                raise
    except TimeoutError:
        response.close()
        problem = (
            f"went silent for {path.idle_timeout:g}s in the middle of its answer"
            if silent
            else f"did not finish its answer within {limit:g}s"
        )
        raise BreakerFailure(errors.UpstreamTimeout(f"upstream {name!r} {problem}")) from None
    except BrokenAnswer:
        response.close()
        raise BreakerFailure(
            errors.UpstreamError(f"upstream {name!r} broke off its answer")
        ) from None
    except BaseException:
        response.close()  # cancelled: the client left
        raise


def _timed_out(path: RoutePath, attempts: int, waited: float) -> errors.UpstreamTimeout:
    """The client's 504 names the whole wait, and which limit ended it."""
    name, route = path.upstream.name, path.route
    if waited >= route.timeout * 0.99:
        limit = f"the route's {route.timeout:g}s deadline"
    else:
        limit = f"{path.per_try_timeout:g}s per attempt"
    return errors.UpstreamTimeout(
        f"upstream {name!r} did not start answering: waited {waited:.3g}s over "
        f"{attempts} attempt(s), {limit}"
    )


def _retry_reason(failure: errors.SidecarError | ModelFailed) -> str:
    if isinstance(failure, ModelFailed):
        return "status"
    if isinstance(failure, errors.UpstreamTimeout):
        return "timeout"
    return "connect"


def forward(request: Request, ctx: RequestContext, path: RoutePath) -> Awaitable[Answer]:
    """Forward one request along its route, relay (or replace) the answer, and mirror it
    to the route's shadow when it is sampled. Not a coroutine itself: the caller awaits
    the one that does the work, a level fewer on every resumption."""
    body = ctx.body
    call = UpstreamCall(
        method=request.method,
        target=request.target,
        headers=upstream_request_headers(request, ctx, path.credentials),
        # A declared body is sent with its length, even an empty one (a POST without
        # Content-Length may get 411 from the model server).
        body=body if body or request.body_exists or request.content_length is not None else None,
        request_id=ctx.request_id,
    )
    mirror = path.shadow
    if mirror is None:
        return _answer(request, ctx, path, call)
    return _mirrored(request, ctx, path, call, mirror)


async def _mirrored(
    request: Request, ctx: RequestContext, path: RoutePath, call: UpstreamCall, mirror: ShadowMirror
) -> Answer:
    """``_answer``, with a copy of the call to the shadow when it is sampled."""
    ticket = None if ctx.shed is not None else mirror.mirror(call)
    if ticket is not None:
        ctx.capture = StreamCapture(mirror.settings.compare.max_body_size)
    answer: Answer | None = None
    failed = False  # the primary was asked, and neither it nor the fallback answered
    try:
        answer = await _answer(request, ctx, path, call)
        return answer
    except (errors.UpstreamError, errors.UpstreamTimeout):
        failed = True  # not a reload's refusal, nor an open circuit, nor a shed request
        raise
    finally:
        if ticket is not None:
            ticket.resolve(_primary_outcome(ctx, answer))
        _report_primary(mirror, ctx, answer, failed, mirrored=ticket is not None)


def _report_primary(
    mirror: ShadowMirror, ctx: RequestContext, answer: Answer | None, failed: bool, mirrored: bool
) -> None:
    """What the request tells the governor of the primary model: its time to answer
    and whether that was a 5xx, when it answered. When the fallback answered for it,
    a failure without a latency: the time then was a secondary model's (or none, for
    the cache, rules and static steps), and a fallback's 200 does not make the
    primary's failure a success. Nothing when the primary was never asked (an open
    circuit, a shed request) or the request ended otherwise (the client left, a
    reload refused it)."""
    if ctx.attempts == 0:
        return
    if answer is not None and ctx.answered_by == "model":
        mirror.governor.record_primary(
            ctx.upstream_seconds, error=answer.status >= 500, mirrored=mirrored
        )
    elif failed or (answer is not None and ctx.answered_by == "fallback"):
        mirror.governor.record_primary(None, error=True, mirrored=mirrored)


def _primary_outcome(ctx: RequestContext, answer: Answer | None) -> PrimaryOutcome:
    if answer is None:
        return PrimaryOutcome(0, None, None, reason="primary failed")
    if ctx.answered_by == "fallback":
        # No latency of the primary's: the time was the fallback's (a secondary
        # model's, or none).
        return PrimaryOutcome(answer.status, None, None, reason="primary answered by fallback")
    latency = ctx.upstream_seconds
    encoding = answer.headers.get_raw(b"content-encoding")
    if isinstance(answer, Response):
        return PrimaryOutcome(
            answer.status,
            answer.body,
            latency,
            encoding=encoding,
            json_head=answer.headers.text(JSON_HEAD_KEY),
        )
    if ctx.ending is not None:
        # The stream broke off (the model, or the client left): what was captured is a
        # fragment, and comparing it would count the cut as the candidate disagreeing.
        return PrimaryOutcome(answer.status, None, latency, reason=f"primary {ctx.ending}")
    capture = ctx.capture
    if capture is None or capture.overflow:
        return PrimaryOutcome(answer.status, None, latency, reason="too_large")
    streamed = answer.content_type == "text/event-stream"
    return PrimaryOutcome(
        answer.status,
        b"".join(capture.chunks),
        latency,
        streamed=streamed,
        encoding=encoding,
        json_head=answer.headers.text(JSON_HEAD_KEY),  # a large binary V2 answer comes here
    )


async def _answer(
    request: Request, ctx: RequestContext, path: RoutePath, call: UpstreamCall
) -> Answer:
    body = ctx.body
    breaker = path.guard.breaker
    if breaker is not None:
        ctx.breaker_state = breaker.state
    cause: errors.SidecarError | ModelFailed
    streamed_probe: bool | None = None  # a stream's breaker outcome waits for its end
    try:
        if ctx.shed is not None:
            raise ctx.shed  # the fallback did not answer
        if breaker is None:
            response = await _with_retries(path, ctx, call, False)
            if _read_whole_first(request, response):
                await _arrive_whole(path, ctx, response)
        else:
            with breaker.attempt() as probe:
                response = await _with_retries(path, ctx, call, probe)
                if _read_whole_first(request, response):
                    await _arrive_whole(path, ctx, response)
                elif not response.complete and not path.falls_back_on(response.status):
                    # Relayed as it comes: whether the model finishes it is known at
                    # its end.
                    streamed_probe = probe
                    breaker.defer()
    except BreakerFailure as failure:
        cause = failure.cause
    except (errors.CircuitOpen, errors.Overloaded) as exc:
        cause = exc
    else:
        if path.falls_back_on(response.status):
            cause = ModelFailed(response)
        else:
            try:
                answer = await relay(request, ctx, path.upstream, response, path.idle_timeout)
            except errors.SidecarError as exc:
                # An answer read whole before relaying broke off or went silent: nothing
                # reached the client yet, so the fallback may still answer. (A streamed
                # one that fails after its first byte is cut short inside relay.)
                cause = exc
            else:
                ending = ctx.ending
                # A stream whose client left (client_closed) says nothing, as a
                # cancelled attempt does.
                if (
                    streamed_probe is not None
                    and breaker is not None
                    and (ending is None or ending == OUTCOME_ABORTED)
                ):
                    breaker.settle_late(streamed_probe, failed=ending is not None)
                _record(request, path, ctx, body, answer)
                return answer
            finally:
                response.release()

    fallback = path.fallback
    if (
        fallback is not None
        and _trigger(cause) in fallback.triggers
        and (not isinstance(cause, ModelFailed) or path.falls_back_on(cause.response.status))
    ):
        asked_at = time.perf_counter()
        try:
            replacement = await fallback.answer(call, body)
        except BaseException:
            # Cancelled (the client left) while a secondary model was asked: the
            # model's answer held meanwhile must free its connection slot.
            if isinstance(cause, ModelFailed):
                cause.response.close()
            raise
        if replacement is not None:
            if isinstance(cause, ModelFailed):
                cause.response.release()
            return await _answer_from_fallback(request, ctx, path, replacement)
        # The model's answer may still be relayed: its upstream time (Server-Timing,
        # the access log, the shadow governor) is the model's, not the time the
        # fallback took to find no answer meanwhile.
        ctx.fallback_seconds = time.perf_counter() - asked_at
    if isinstance(cause, ModelFailed):
        try:
            if _read_whole_first(request, cause.response):
                # The model's own 502/503/504, small, is read whole like any small
                # answer: within the attempt's limit, however slowly it trickles.
                try:
                    await _arrive_whole(path, ctx, cause.response)
                except BreakerFailure as failure:
                    raise failure.cause from None
            return await relay(request, ctx, path.upstream, cause.response, path.idle_timeout)
        finally:
            cause.response.release()
    raise cause


async def _answer_from_fallback(
    request: Request, ctx: RequestContext, path: RoutePath, answer: Response | SecondaryAnswer
) -> Answer:
    """The fallback's answer to the client, counted. A secondary model's is relayed
    as the primary's are: a stream goes on as it comes."""
    if isinstance(answer, SecondaryAnswer):
        ctx.capture = None  # no shadow comparison: the primary did not answer
        rule = answer.upstream.name
        path.metrics.fallbacks.labels(path.route.name, rule).inc()
        # Its upstream time is the secondary's own (the primary's failed wait, or
        # none with the circuit open, is not what answered).
        ctx.upstream_started = answer.started
        response = answer.response
        # The client's header fields now (what Connection lists, and Connection, left
        # out), then the stamp: a secondary listing X-Sidecar-Fallback cannot drop it.
        response.headers = client_response_headers(response.headers).without(_CONNECTION)
        response.headers[FALLBACK_HEADER] = rule
        try:
            relayed = await relay(request, ctx, answer.upstream, answer.response, path.idle_timeout)
        finally:
            answer.response.release()
            ctx.answered_by, ctx.fallback_rule = "fallback", rule
        return relayed
    rule = answer.headers.get("X-Sidecar-Fallback", "") or ""
    ctx.answered_by, ctx.fallback_rule = "fallback", rule
    ctx.bytes_out = len(answer.body)
    path.metrics.fallbacks.labels(path.route.name, rule).inc()
    return answer


def _json_head(headers: Headers, size: int) -> int | None:
    """The JSON head length of a binary V2 body of ``size`` bytes with these fields,
    or None. The field is looked up here, compiled: ``json_head_length`` is not, and
    calling it for every body, most without the field, cost 1.5k instructions."""
    value = headers.text(JSON_HEAD_KEY)
    return None if value is None else json_head_length(value, size)


def _record(
    request: Request,
    path: RoutePath,
    ctx: RequestContext,
    request_body: bytes,
    answer: Answer,
) -> None:
    """Hand a model's answer read whole to the cache, the drift window and the payload log.

    Each is an append or a dict insert: parsing and writing happen off the hot path.
    Streamed answers were never held whole, so they are not recorded.
    """
    if not isinstance(answer, Response):
        return
    body = answer.body
    status = answer.status
    if 200 <= status < 300:
        cache = path.fallback.cache if path.fallback is not None else None
        drift = path.drift
        if cache is not None or drift is not None:
            # Binary V2 tensors follow a JSON head of this length (config.tensors).
            answer_head = _json_head(answer.headers, len(body))
            request_head = _json_head(request.headers, len(request_body))
            # The sidecar's own credential is never sent on: a client's Authorization
            # reached the model only when the sidecar does not take that field itself.
            if cache is not None and keeps(
                status,
                answer.headers,
                authorized=_AUTHORIZATION not in path.credentials
                and request.headers.has(_AUTHORIZATION),
            ):
                cache.store(
                    request.method,
                    request.target,
                    request_body,
                    status,
                    # The whole field, not ``answer.content_type`` (the media type alone):
                    # a charset is part of what the bytes mean.
                    answer.headers.get("Content-Type"),
                    body,
                    answer_head,
                    request_head,
                )
            if drift is not None:
                drift.observe(request_body, body, request_head, answer_head)
    if path.payload_log is not None and sampled(path.route.payload_sample):
        record: dict[str, Any] = {
            "timestamp": time.time(),
            "request_id": ctx.request_id,
            "route": path.route.name,
            "status": answer.status,
            "request": request_body,
            "response": body,
        }
        heads = (
            _json_head(request.headers, len(request_body)),
            _json_head(answer.headers, len(body)),
        )
        if heads != (None, None):
            record[JSON_HEADS] = heads
        path.payload_log.submit(
            record,
            # The bodies are what it holds: the log's byte budget counts them.
            size=len(request_body) + len(body) + 256,
        )
