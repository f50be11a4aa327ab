"""The hot path's tallies publish exactly what prometheus-client's own updates would."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram

from sidecar.telemetry.metrics import MODEL_LATENCY_BUCKETS, Metrics, Tally

# On a bucket bound, between bounds, below the first, past the last.
VALUES = [0.0, 0.001, 0.0011, 0.003, 0.025, 0.7, 30.0, 31.0, 1e9]


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for family in registry.collect()
        if family.name == name
        for sample in family.samples
    }


def test_a_tally_moved_into_a_histogram_equals_observing_each_value() -> None:
    observed, tallied = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h", "h", buckets=MODEL_LATENCY_BUCKETS, registry=observed)
    target = Histogram("h", "h", buckets=MODEL_LATENCY_BUCKETS, registry=tallied)
    tally = Tally(MODEL_LATENCY_BUCKETS)
    for value in VALUES:
        direct.observe(value)
        tally.observe(value)
    tally.move_into(target)
    assert samples(tallied, "h") == samples(observed, "h")
    # Moved, not copied: a second move adds nothing.
    tally.move_into(target)
    assert samples(tallied, "h") == samples(observed, "h")
    assert tally.observed == 0
    assert tally.total == 0.0


def test_requests_reach_the_registry_when_published_and_in_every_render() -> None:
    metrics = Metrics()
    metrics.count_request("infer", 200, "ok", 0.002)
    metrics.count_request("infer", 200, "ok", 0.5)
    metrics.observe_upstream("model", 0.001)
    metrics.handling = 3
    value = metrics.registry.get_sample_value
    labels = {"route": "infer", "status": "200", "outcome": "ok"}
    assert value("sidecar_requests_total", labels) is None  # tallied, not yet published
    text = metrics.render().decode()
    assert 'sidecar_requests_total{outcome="ok",route="infer",status="200"} 2.0' in text
    assert value("sidecar_request_duration_seconds_count", {"route": "infer"}) == 2
    assert math.isclose(
        value("sidecar_request_duration_seconds_sum", {"route": "infer"}) or 0.0, 0.502
    )
    assert (
        value("sidecar_upstream_duration_seconds_bucket", {"upstream": "model", "le": "0.001"}) == 1
    )
    assert value("sidecar_in_flight_requests") == 3
    metrics.count_request("infer", 200, "ok", 0.1)
    metrics.publish()
    assert value("sidecar_requests_total", labels) == 3
