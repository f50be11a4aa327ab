"""Every Prometheus series the sidecar exports, declared once on an injectable registry.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set before start),
prometheus-client keeps each process's values in files there, and ``render`` sums
them; gauges say how they combine (sum, min or max over live workers only). Those
files cannot forget a series, so ``sidecar_config_info`` (whose labels change with
every reload) is kept apart: one small file per worker naming its config in service,
rewritten at each reload and removed with the worker (``forget_worker``).

Label values come from config names (route and upstream names), HTTP status codes
and a fixed set of outcomes, never from raw paths or request ids, so the number of
series stays bounded whatever the traffic.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from sidecar.config.schema import multiprocess_directory

# Model latency spans GPU micro-batches (ms) to LLM generations (tens of seconds).
# Not Final: mypyc (2.x) leaves a Final tuple of floats unset (NameError at first use).
MODEL_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# Outcomes of a request, as used in sidecar_requests_total and the access log.
OUTCOME_OK: Final = "ok"  # the model answered (any status below 500)
OUTCOME_MODEL_ERROR: Final = "model_error"  # the model answered with a 5xx, passed through
OUTCOME_REJECTED: Final = "rejected"  # the sidecar refused the request (4xx of its own)
OUTCOME_UPSTREAM_FAILED: Final = "upstream_failed"  # no usable answer: 502/504 of the sidecar
OUTCOME_ABORTED: Final = "aborted"  # the upstream failed after the response had started
OUTCOME_CLIENT_CLOSED: Final = "client_closed"  # the client went away before the answer ended
OUTCOME_OVERLOADED: Final = "overloaded"  # shed or circuit open without a fallback
OUTCOME_FALLBACK: Final = "fallback"  # answered by a fallback rule instead of the model
OUTCOME_ERROR: Final = "error"  # a bug in the sidecar (500)
OUTCOME_OWN: Final = "own"  # the sidecar's own endpoints (/livez, /readyz, ...)

# Why the global rate limit was decided by the local bucket instead of Redis, as used in
# sidecar_ratelimit_local_fallback_total.
LOCAL_BUSY: Final = "busy"  # every connection to Redis stayed in use for the whole wait
LOCAL_QUEUE_FULL: Final = "queue_full"  # max_waiting requests already waited: none more
LOCAL_REDIS_DOWN: Final = "redis_down"  # Redis lost (within retry_after), or this call failed
LOCAL_REASONS: Final = (LOCAL_BUSY, LOCAL_QUEUE_FULL, LOCAL_REDIS_DOWN)

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


# The *_created series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests_total",
            "Requests answered, by route, HTTP status and outcome.",
            ["route", "status", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from request received to response finished, by route.",
            ["route"],
            buckets=MODEL_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "sidecar_upstream_duration_seconds",
            "Time until the upstream's response headers arrived, by upstream.",
            ["upstream"],
            buckets=MODEL_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "sidecar_in_flight_requests",
            "Requests being handled right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_ready = Gauge(
            "sidecar_upstream_ready",
            "1 when the upstream's last readiness probe passed, else 0.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemin",
        )

        self.retries = Counter(
            "sidecar_retries_total",
            "Retries sent to an upstream, by reason (connect, timeout, status).",
            ["upstream", "reason"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "sidecar_retry_budget_exhausted_total",
            "Retries not sent because the upstream's retry budget was used up.",
            ["upstream"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "sidecar_circuit_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.circuit_transitions = Counter(
            "sidecar_circuit_transitions_total",
            "Circuit breaker state changes per upstream.",
            ["upstream", "from_state", "to_state"],
            registry=r,
        )
        self.fallbacks = Counter(
            "sidecar_fallback_total",
            "Answers given by a fallback instead of the model, by route and rule.",
            ["route", "rule"],
            registry=r,
        )

        self.log_dropped = Counter(
            "sidecar_log_dropped_total",
            "Log records lost, by log and reason: queue_full (refused at once), stopped "
            "(submitted after the log closed), unrenderable (not writable as JSON), "
            "unwritten (the sink failed or was stuck).",
            ["log", "reason"],
            registry=r,
        )
        self.log_written = Counter(
            "sidecar_log_written_total",
            "Log records written, by log.",
            ["log"],
            registry=r,
        )
        self.log_queue_depth = Gauge(
            "sidecar_log_queue_depth",
            "Log records waiting to be written, by log.",
            ["log"],
            registry=r,
            multiprocess_mode="livesum",
        )

        self.prediction_psi = Gauge(
            "sidecar_prediction_psi",
            "Population stability index of predictions against the baseline, by route.",
            ["route"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.feature_psi = Gauge(
            "sidecar_feature_psi",
            "Population stability index of an input feature against the baseline.",
            ["route", "feature"],
            registry=r,
            multiprocess_mode="livemax",
        )

        self.feature_quality = Counter(
            "sidecar_feature_quality_total",
            "Drift features that arrived missing, null, not a number, or outside the "
            "range the baseline saw, by route, feature and problem.",
            ["route", "feature", "problem"],
            registry=r,
        )
        self.process_cpu = Counter(
            "sidecar_process_cpu_seconds",
            "CPU time used by the sidecar's processes (every worker counted).",
            registry=r,
        )
        self.process_memory = Gauge(
            "sidecar_process_resident_memory_bytes",
            "Resident memory of the sidecar's processes, summed over live workers.",
            registry=r,
            multiprocess_mode="livesum",
        )

        self.schema_violations = Counter(
            "sidecar_schema_violations_total",
            "Requests refused by a route's JSON Schema, by route and failing field.",
            ["route", "field"],
            registry=r,
        )

        self.auth_failures = Counter(
            "sidecar_auth_failures_total",
            "Requests refused by authentication or authorisation, by reason.",
            ["reason"],
            registry=r,
        )
        self.ratelimited = Counter(
            "sidecar_ratelimited_total",
            "Requests over a rate limit, by scope, principal and mode (enforced/report_only).",
            ["scope", "principal", "mode"],
            registry=r,
        )

        self.shadow_requests = Counter(
            "sidecar_shadow_requests_total",
            "Shadow copies by outcome: sent, and of those error, timeout or "
            "skipped_too_large; skipped_busy ones were never sent.",
            ["route", "outcome"],
            registry=r,
        )
        self.shadow_comparisons = Counter(
            "sidecar_shadow_comparisons_total",
            "Comparisons of shadow and primary answers: match, mismatch, error (the "
            "shadow failed, or an answer could not be read) or skipped (nothing to "
            "compare: the primary gave no answer of its own, or one was too large).",
            ["route", "result"],
            registry=r,
        )
        self.shadow_latency_delta = Histogram(
            "sidecar_shadow_latency_delta_seconds",
            "Shadow model latency minus primary model latency.",
            ["route"],
            buckets=(
                -5.0,
                -1.0,
                -0.5,
                -0.1,
                -0.05,
                -0.01,
                -0.001,
                0.0,
                0.001,
                0.01,
                0.05,
                0.1,
                0.5,
                1.0,
                5.0,
            ),
            registry=r,
        )
        self.shadow_fraction = Gauge(
            "sidecar_shadow_fraction",
            "The share of requests mirrored right now (after the governor).",
            ["route"],
            registry=r,
            multiprocess_mode="livemin",
        )

        self.dropped = Counter(
            "sidecar_dropped_total",
            "Items a bounded buffer let go: fallback cache answers evicted, drift bodies "
            "not taken in (over the budget, too large, superseded or unreadable), "
            "requests refused for want of room for their body or head (request_bodies, "
            "request_heads).",
            ["buffer", "route"],
            registry=r,
        )

        self.upstream_stray = Counter(
            "sidecar_upstream_stray_total",
            "Upstream connections closed because bytes nobody asked for arrived (a stray "
            "or second answer): such a connection is never reused.",
            ["upstream"],
            registry=r,
        )
        self.upstream_replayed = Counter(
            "sidecar_upstream_replayed_total",
            "Requests sent again on a fresh connection after a kept-alive one closed "
            "before answering.",
            ["upstream"],
            registry=r,
        )
        self.slow_clients = Counter(
            "sidecar_slow_clients_total",
            "Client connections cut off for reading nothing of their answer for "
            "server.send_timeout.",
            registry=r,
        )

        self.config_reloads = Counter(
            "sidecar_config_reloads_total",
            "Config reloads by result (ok, invalid, ignored while draining).",
            ["result"],
            registry=r,
        )
        self.config_info = Gauge(
            "sidecar_config_info",
            CONFIG_INFO_HELP,
            ["sha256", "path"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._config_in_service: tuple[str, str] | None = None
        self._upstreams_in_service: frozenset[str] | None = None

        self.loop_lag = Gauge(
            "sidecar_event_loop_lag_seconds",
            "How late the event loop woke a timer, last measured.",
            registry=r,
            multiprocess_mode="livemax",
        )

        self.shared_state_up = Gauge(
            "sidecar_shared_state_up",
            "1 while Redis-shared limits and breaker state work; 0: local fallback.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.ratelimit_local_fallback = Counter(
            "sidecar_ratelimit_local_fallback_total",
            "Requests whose global rate limit the local bucket decided instead of Redis, by "
            "reason: busy (every connection to Redis stayed in use for shared_state.timeout), "
            "queue_full (shared_state.max_waiting requests were already waiting), "
            "redis_down (Redis lost, or the call to it failed).",
            ["reason"],
            registry=r,
        )

        # The hot path's series (every request touches them) are tallied in plain ints
        # and published to the registry by ``publish``: before each render, and every
        # second (``publish_every``) so other workers' renders see them. Each
        # prometheus-client update takes a lock; a request made seven of them.
        self.handling = 0  # requests being handled, published as sidecar_in_flight_requests
        self._requests: dict[tuple[str, int, str], int] = {}
        self._request_tallies: dict[str, Tally] = {}
        self._upstream_tallies: dict[str, Tally] = {}
        # Counts other layers keep as plain ints, moved here by ``publish``.
        self._publishers: list[Callable[[], None]] = []

    def on_publish(self, publisher: Callable[[], None]) -> None:
        """Call ``publisher`` at each publish (it moves its own counts into series)."""
        self._publishers.append(publisher)

    def count_request(self, route: str, status: int, outcome: str, seconds: float) -> None:
        key = (route, status, outcome)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        tally = self._request_tallies.get(route)
        if tally is None:
            tally = self._request_tallies[route] = Tally(MODEL_LATENCY_BUCKETS)
        tally.observe(seconds)

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        tally = self._upstream_tallies.get(upstream)
        if tally is None:
            tally = self._upstream_tallies[upstream] = Tally(MODEL_LATENCY_BUCKETS)
        tally.observe(seconds)

    def publish(self) -> None:
        """Move the tallies of the hot path's series into the registry."""
        requests, self._requests = self._requests, {}
        for (route, status, outcome), count in requests.items():
            self.requests.labels(route, str(status), outcome).inc(count)
        for family, tallies in (
            (self.request_duration, self._request_tallies),
            (self.upstream_duration, self._upstream_tallies),
        ):
            for label, tally in tallies.items():
                if tally.observed:
                    tally.move_into(family.labels(label))
        self.in_flight.set(self.handling)
        for publisher in self._publishers:
            publisher()

    async def publish_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.publish()

    def set_config_in_service(
        self, sha256: str, path: str, upstreams: frozenset[str] | None = None
    ) -> None:
        """``sidecar_config_info`` names this config alone: the previous one's series is
        removed, not set to 0, or reloads of a changing config would add a series each.
        ``upstreams``: the upstreams it names; a scrape leaves out the series of any
        other (a removed upstream's last circuit state or readiness must not stand)."""
        self._upstreams_in_service = upstreams
        labels = (sha256, path)
        directory = multiprocess_directory()
        if directory is not None:
            # prometheus-client's files keep a removed series (it only warns), at the
            # value it last had: this worker's own file says which config it serves.
            own = _config_info_file(directory, os.getpid())
            scratch = os.path.join(directory, f".config_info_{os.getpid()}.tmp")
            with open(scratch, "w", encoding="utf-8") as file:
                json.dump(labels, file)
            os.replace(scratch, own)  # a render reads the old file or the new, whole
        else:
            if self._config_in_service is not None and self._config_in_service != labels:
                self.config_info.remove(*self._config_in_service)
            self.config_info.labels(*labels).set(1)
        self._config_in_service = labels

    def render(self) -> bytes:
        """Prometheus text; with several worker processes, the sum over all of them."""
        self.publish()
        directory = multiprocess_directory()
        registry = self.registry
        if directory is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
            registry.register(ConfigsInService(directory))
        upstreams = self._upstreams_in_service
        if upstreams is None:
            return generate_latest(registry)
        return generate_latest(UpstreamsInService(registry, upstreams))


CONFIG_INFO_HELP: Final = "The config in service: 1, labelled with its file's sha256 and path."


def _config_info_file(directory: str, pid: int) -> str:
    return os.path.join(directory, f"config_info_{pid}.json")


def forget_worker(directory: str, pid: int) -> None:
    """Drop a dead worker's config in service (its gauges go with ``mark_process_dead``)."""
    Path(_config_info_file(directory, pid)).unlink(missing_ok=True)


class UpstreamsInService:
    """A registry's metrics without the series of upstreams the config in service does
    not name. Prometheus-client cannot forget a series in its multiprocess files, and
    a removed upstream's open circuit would otherwise fire its alert for good."""

    def __init__(self, registry: CollectorRegistry, upstreams: frozenset[str]) -> None:
        self.registry = registry
        self.upstreams = upstreams

    def collect(self) -> Iterator[Metric]:
        upstreams = self.upstreams
        for metric in self.registry.collect():
            metric.samples = [
                sample
                for sample in metric.samples
                if sample.labels.get("upstream", "") in upstreams or "upstream" not in sample.labels
            ]
            yield metric


class ConfigsInService:
    """``sidecar_config_info`` with workers: the configs live workers serve, 1 each."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "sidecar_config_info", CONFIG_INFO_HELP, labels=["sha256", "path"]
        )
        seen: set[tuple[str, str]] = set()
        for name in sorted(
            glob.glob(os.path.join(glob.escape(self.directory), "config_info_*.json"))
        ):
            try:
                with open(name, encoding="utf-8") as file:
                    sha256, path = json.load(file)
            except FileNotFoundError:  # its worker was marked dead meanwhile
                continue
            labels = (str(sha256), str(path))
            if labels not in seen:
                seen.add(labels)
                family.add_metric(list(labels), 1)
        yield family


class Tally:
    """A histogram's observations between two publishes, in plain numbers."""

    __slots__ = ("bounds", "counts", "observed", "total")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = (*buckets, float("inf"))
        self.counts = [0] * len(self.bounds)
        self.observed = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value, as prometheus-client's own:
        # scanned from the smallest, where nearly every request falls, in compiled
        # float comparisons (bisect compares Python objects through a call).
        bounds = self.bounds
        last = len(bounds) - 1  # +Inf takes the rest (a NaN, which no duration is, the first)
        index = 0
        while index < last and value > bounds[index]:
            index += 1
        self.counts[index] += 1
        self.observed += 1
        self.total += value

    def move_into(self, child: Any) -> None:
        """Add the tally to a prometheus-client histogram child, then start again.
        Its ``_buckets`` (per-bucket counts, not cumulative) and ``_sum`` values are
        what its ``observe`` updates; a unit test checks the two agree."""
        for index, count in enumerate(self.counts):
            if count:
                child._buckets[index].inc(count)
                self.counts[index] = 0
        child._sum.inc(self.total)
        self.observed = 0
        self.total = 0.0
