"""The access record of one request: its fields in a fixed order, each its own dict."""

from __future__ import annotations

import time

from sidecar.pipeline.context import RequestContext
from sidecar.pipeline.stages import access_record


def context(request_id: str) -> RequestContext:
    return RequestContext(
        request_id=request_id, sidecar_id="s-" + request_id, traceparent="", trace_id=""
    )


def test_a_proxied_request() -> None:
    ctx = context("r1")
    ctx.route_name, ctx.outcome, ctx.attempts = "infer", "ok", 2
    ctx.upstream_seconds, ctx.bytes_in, ctx.bytes_out = 0.0015, 10, 20
    ctx.breaker_state, ctx.principal = "closed", "team-a"
    before = time.time()
    record = access_record(ctx, "POST", "/v2/infer", 200, 0.0025)
    stamp = record["timestamp"]
    assert before <= stamp <= time.time()
    # In this order, as the log lines show them.
    assert list(record.items()) == [
        ("event", "request"),
        ("timestamp", stamp),
        ("request_id", "r1"),
        ("sidecar_id", "s-r1"),
        ("trace_id", None),
        ("route", "infer"),
        ("method", "POST"),
        ("path", "/v2/infer"),
        ("status", 200),
        ("outcome", "ok"),
        ("duration_ms", 2.5),
        ("upstream_ms", 1.5),
        ("attempts", 2),
        ("breaker", "closed"),
        ("fallback", None),
        ("principal", "team-a"),
        ("bytes_in", 10),
        ("bytes_out", 20),
    ]


def test_a_request_that_never_reached_the_model_has_no_upstream_time() -> None:
    first = access_record(context("r1"), "GET", "/", 404, 0.001)
    first["upstream_ms"] = 7.0  # a record handed on is its owner's to change
    second = access_record(context("r2"), "GET", "/", 404, 0.001)
    assert second["upstream_ms"] is None
    assert second["request_id"] == "r2"
    assert first["request_id"] == "r1"
    assert list(second) == list(first)
