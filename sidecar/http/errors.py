"""The sidecar's own errors, and the one place they become HTTP responses.

    SidecarError
     ├── BadRequest            400 bad_request
     ├── InvalidJson           400 invalid_json
     ├── Unauthorized          401 unauthorized
     ├── Forbidden             403 forbidden
     ├── NoRoute               404 no_route
     ├── MethodNotAllowed      405 method_not_allowed
     ├── RequestTimeout        408 request_timeout
     ├── BodyTooLarge          413 body_too_large
     ├── UnsupportedMediaType  415 unsupported_media_type
     ├── HeaderTooLarge        431 header_too_large
     ├── SchemaViolation       422 schema_violation
     ├── RateLimited           429 rate_limited
     ├── InternalError         500 internal_error
     ├── UpstreamError         502 upstream_error
     ├── Overloaded            503 overloaded
     ├── CircuitOpen           503 circuit_open
     ├── Reloaded              503 reloaded
     ├── UpstreamTimeout       504 upstream_timeout
     └── VersionNotSupported   505 http_version_not_supported

Middlewares and handlers raise these; only the error boundary turns them into a
response (``error_response``). A model server's own error answers are not
``SidecarError``: they pass through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import orjson

from sidecar.http.messages import Response
from sidecar.http.server import RequestRefused
from sidecar.telemetry.metrics import (
    OUTCOME_ERROR,
    OUTCOME_OVERLOADED,
    OUTCOME_REJECTED,
    OUTCOME_UPSTREAM_FAILED,
)


class SidecarError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    outcome: ClassVar[str] = OUTCOME_ERROR  # as counted in metrics and the access log

    def __init__(
        self,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        close_connection: bool = False,
        retryable: bool = False,
        details: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        # True when the request body was left unread: the connection cannot be reused.
        self.close_connection = close_connection
        # True for upstream failures a retry may cure (connect errors, per-try timeouts).
        self.retryable = retryable
        self.details = details  # e.g. every failing path of a schema violation


class BadRequest(SidecarError):
    status, type = 400, "bad_request"
    outcome = OUTCOME_REJECTED


class InvalidJson(SidecarError):
    status, type = 400, "invalid_json"
    outcome = OUTCOME_REJECTED


class Unauthorized(SidecarError):
    status, type = 401, "unauthorized"
    outcome = OUTCOME_REJECTED


class Forbidden(SidecarError):
    status, type = 403, "forbidden"
    outcome = OUTCOME_REJECTED


class NoRoute(SidecarError):
    status, type = 404, "no_route"
    outcome = OUTCOME_REJECTED


class MethodNotAllowed(SidecarError):
    status, type = 405, "method_not_allowed"
    outcome = OUTCOME_REJECTED


class RequestTimeout(SidecarError):
    status, type = 408, "request_timeout"
    outcome = OUTCOME_REJECTED


class BodyTooLarge(SidecarError):
    status, type = 413, "body_too_large"
    outcome = OUTCOME_REJECTED


class HeaderTooLarge(SidecarError):
    status, type = 431, "header_too_large"
    outcome = OUTCOME_REJECTED


class UnsupportedMediaType(SidecarError):
    status, type = 415, "unsupported_media_type"
    outcome = OUTCOME_REJECTED


class SchemaViolation(SidecarError):
    status, type = 422, "schema_violation"
    outcome = OUTCOME_REJECTED


class RateLimited(SidecarError):
    status, type = 429, "rate_limited"
    outcome = OUTCOME_REJECTED


class InternalError(SidecarError):
    status, type = 500, "internal_error"


class UpstreamError(SidecarError):
    status, type = 502, "upstream_error"
    outcome = OUTCOME_UPSTREAM_FAILED


class Overloaded(SidecarError):
    status, type = 503, "overloaded"
    outcome = OUTCOME_OVERLOADED


class CircuitOpen(SidecarError):
    status, type = 503, "circuit_open"
    outcome = OUTCOME_OVERLOADED


class Reloaded(SidecarError):
    """The config the request arrived under was retired by a reload, and the request
    outlasted its drain time before it could be sent on (a slow upload): the
    upstream connections of that config are closed. Not the model's failure: it
    neither counts against the breaker nor calls on the fallback."""

    status, type = 503, "reloaded"
    outcome = OUTCOME_OVERLOADED


class UpstreamTimeout(SidecarError):
    status, type = 504, "upstream_timeout"
    outcome = OUTCOME_UPSTREAM_FAILED


class VersionNotSupported(SidecarError):
    status, type = 505, "http_version_not_supported"
    outcome = OUTCOME_REJECTED


_REFUSALS: dict[str, type[SidecarError]] = {
    kind.type: kind
    for kind in (
        BadRequest,
        BodyTooLarge,
        HeaderTooLarge,
        RequestTimeout,
        VersionNotSupported,
        InternalError,
        Overloaded,
    )
}


def from_refusal(refusal: RequestRefused) -> SidecarError:
    """The HTTP layer's refusal as our error; its connection closes after the answer."""
    kind = _REFUSALS.get(refusal.kind, BadRequest)
    return kind(refusal.message, close_connection=True)


def error_body(
    error_type: str,
    message: str,
    request_id: str,
    details: list[dict[str, str]] | None = None,
    protocol: str = "plain",
) -> bytes:
    """The error in the shape the route's clients read.

    plain   {"error": {"type", "message", "request_id", "details"?}}
    v2      {"error": "message", "type", "request_id", ...}: the Open Inference
            Protocol's error is a string, which tritonclient and KServe clients print
    openai  {"error": {"message", "type", "param", "code", "request_id"}}: OpenAI's
            error object, which the openai package turns into its exceptions
    """
    if protocol == "v2":
        body: dict[str, object] = {"error": message, "type": error_type, "request_id": request_id}
        if details:
            body["details"] = details
        return orjson.dumps(body)
    if protocol == "openai":
        error = {
            "message": message,
            "type": error_type,
            "param": None,
            "code": error_type,
            "request_id": request_id,
        }
        return orjson.dumps({"error": error})
    plain: dict[str, object] = {"type": error_type, "message": message, "request_id": request_id}
    if details:
        plain["details"] = details
    return orjson.dumps({"error": plain})


def error_response(error: SidecarError, request_id: str, protocol: str = "plain") -> Response:
    """The JSON error body of DESIGN.md, with the request id in body and header."""
    response = Response(
        error.status,
        error_body(error.type, error.message, request_id, error.details, protocol),
        error.headers,
        content_type="application/json",
        # An unread body: the connection closes after the answer ("Connection: close").
        close=error.close_connection,
    )
    response.headers["X-Request-ID"] = request_id
    return response
