"""Per-request state shared by the pipeline stages, and what the client sees of it."""

from __future__ import annotations

import time
from typing import Any, Final

from sidecar.config.schema import Route
from sidecar.http.errors import Overloaded
from sidecar.http.messages import Headers, RawField
from sidecar.telemetry.logs import CURRENT_REQUEST
from sidecar.telemetry.metrics import (
    OUTCOME_FALLBACK,
    OUTCOME_MODEL_ERROR,
    OUTCOME_OK,
    OUTCOME_OWN,
)

__all__ = ["CURRENT_REQUEST", "RequestContext"]


class RequestContext:
    """One request's state. Most fields keep their default for most requests
    (compiled, each is a slot of the object, filled from the class's defaults)."""

    route: Route | None = None
    route_name: str = "-"
    body_limit: int = 0
    # Facts the stages record; ``decide_outcome`` turns them into the one outcome
    # that metrics and the access log show.
    answered_by: str = "model"  # "model", "fallback", "own"
    ending: str | None = None  # "aborted" or "client_closed" when the answer was cut
    refused: str | None = None  # the outcome of a SidecarError that answered instead
    outcome: str = OUTCOME_OK  # decided once, when the request ends
    attempts: int = 0
    upstream_started: float | None = None
    # Seconds after ``upstream_started`` that were not the model's: a fallback asked
    # while the model's answer waited, which found no answer (the model's is relayed).
    fallback_seconds: float = 0.0
    # The last attempt's time limit, in seconds (a small answer's whole body's too).
    attempt_limit: float = 0.0
    upstream_seconds: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    # Over an in-flight cap: the refusal (naming the cap), unless the fallback answers.
    shed: Overloaded | None = None
    fallback_rule: str | None = None
    breaker_state: str | None = None
    principal: str | None = None
    body: bytes = b""  # the request body, read whole by the body stage
    document: Any = None  # the body parsed as JSON, when the route validates it
    extra_fields: tuple[RawField, ...] = ()  # for the answer (RateLimit-*)
    capture: Any = None  # a shadow.StreamCapture when a streamed answer is compared
    own_name: str | None = None  # set for the sidecar's own endpoints (/livez, ...)

    def __init__(self, request_id: str, sidecar_id: str, traceparent: str, trace_id: str) -> None:
        self.request_id = request_id  # the id the client sees: theirs when sane, else ours
        self.sidecar_id = sidecar_id  # ours, unique for every request (clients may reuse theirs)
        self.traceparent = traceparent
        self.trace_id = trace_id
        self.started = time.perf_counter()

    def finish_upstream(self) -> None:
        """The upstream time (Server-Timing, the access log, the shadow governor):
        from the answering attempt's start to now, less the fallback's time."""
        if self.upstream_started is not None:
            self.upstream_seconds = (
                time.perf_counter() - self.upstream_started - self.fallback_seconds
            )

    def stamp(self, headers: Headers) -> None:
        """Add the identity and timing headers every answer carries."""
        headers.put_raw(b"x-request-id", b"X-Request-ID", self.request_id.encode("latin-1"))
        for key, name, value in self.extra_fields:
            headers.put_raw(key, name, value)
        total = _milliseconds(time.perf_counter() - self.started)
        # add, not put: a model's own Server-Timing entries are kept beside ours.
        if self.upstream_seconds is not None:
            timing = b"upstream;dur=%s, total;dur=%s" % (
                _milliseconds(self.upstream_seconds),
                total,
            )
        else:
            timing = b"total;dur=%s" % total
        headers.add_raw(b"server-timing", b"Server-Timing", timing)


# "000" to "999": the thousandths of a millisecond, as Server-Timing writes them.
_THOUSANDTHS: Final = [b"%03d" % n for n in range(1000)]


def microseconds(seconds: float) -> int:
    """A duration rounded to the microsecond, without ``round()``'s decimal
    conversion: the access record's milliseconds and Server-Timing's come from it."""
    return int(seconds * 1_000_000.0 + 0.5)


def _milliseconds(seconds: float) -> bytes:
    """``b"12.345"`` for 0.012345 s, as ``b"%.3f" % ms`` but with integer steps, which
    compile to C (a float's ``%`` formatting was half of what stamping cost)."""
    micros = microseconds(seconds)
    return b"%d.%s" % (micros // 1000, _THOUSANDTHS[micros % 1000])


def decide_outcome(ctx: RequestContext, status: int) -> str:
    """The request's outcome, in one place: a cut answer, then a refusal or failure of
    the sidecar's, then who answered (own endpoint, fallback, the model: ok, or
    model_error for its 5xx)."""
    if ctx.ending is not None:
        return ctx.ending
    if ctx.refused is not None:
        return ctx.refused
    if ctx.answered_by == "own":
        return OUTCOME_OWN
    if ctx.answered_by == "fallback":
        return OUTCOME_FALLBACK
    return OUTCOME_MODEL_ERROR if status >= 500 else OUTCOME_OK
