"""sidecar.pipeline.context.decide_outcome: the one place a request's outcome is decided."""

from __future__ import annotations

import pytest

from sidecar.pipeline.context import RequestContext, decide_outcome


def ctx(**facts: object) -> RequestContext:
    context = RequestContext(request_id="r", sidecar_id="s", traceparent="t", trace_id="x")
    for name, value in facts.items():
        setattr(context, name, value)
    return context


@pytest.mark.parametrize(
    ("facts", "status", "outcome"),
    [
        ({}, 200, "ok"),
        ({}, 404, "ok"),  # the model's own 4xx is its answer
        ({}, 500, "model_error"),
        ({}, 503, "model_error"),
        ({"answered_by": "fallback"}, 200, "fallback"),
        ({"answered_by": "own"}, 200, "own"),
        ({"answered_by": "own", "refused": "rejected"}, 401, "rejected"),
        ({"refused": "upstream_failed"}, 504, "upstream_failed"),
        ({"refused": "overloaded"}, 503, "overloaded"),
        ({"refused": "error"}, 500, "error"),
        ({"ending": "aborted"}, 200, "aborted"),
        ({"ending": "client_closed", "refused": "rejected"}, 499, "client_closed"),
        ({"ending": "client_closed", "answered_by": "fallback"}, 200, "client_closed"),
    ],
)
def test_the_outcome_follows_what_happened(
    facts: dict[str, object], status: int, outcome: str
) -> None:
    assert decide_outcome(ctx(**facts), status) == outcome
