"""sidecar.upstream.shadow: the governor on hand-fed numbers, and the mirror against an
in-process fake candidate model (loopback, no subprocess)."""

from __future__ import annotations

import asyncio
import gzip
import threading
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from sidecar.analytics.compare import Comparison
from sidecar.config.schema import ShadowGovernor, ShadowSettings, Upstream
from sidecar.http.client import Pool
from sidecar.http.messages import Headers
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.shadow import (
    Governor,
    PrimaryOutcome,
    ShadowMirror,
    ShadowTicket,
    StreamCapture,
    decoded,
)
from sidecar.upstream.upstreams import UpstreamCall, UpstreamClient
from tests.conftest import LOOPBACK, FakeModel, MakeFakeModel, closed_port


def governor(fraction: float = 1.0, **settings: Any) -> Governor:
    values: dict[str, Any] = {"min_samples": 4, "min_latency_increase": "5ms"}
    values.update(settings)
    return Governor(fraction, ShadowGovernor.model_validate(values))


def feed(g: Governor, count: int, latency: float, *, mirrored: bool, errors: int = 0) -> None:
    for i in range(count):
        g.record_primary(latency, error=i < errors, mirrored=mirrored)


# the governor


def test_without_enough_samples_the_fraction_stays_healthy() -> None:
    g = governor()
    for _ in range(3):
        g.record_shadow(failed=True)
    assert g.evaluate() == (1.0, "healthy")


def test_a_failing_shadow_halves_the_fraction_each_interval() -> None:
    g = governor(max_shadow_failure_rate=0.5)
    for failed in (True, True, True, False):
        g.record_shadow(failed=failed)
    assert g.evaluate() == (0.5, "shadow failing")
    for failed in (True, True, False, False):  # exactly the limit: not over it
        g.record_shadow(failed=failed)
    assert g.evaluate() == (0.6, "healthy")


def test_the_fraction_recovers_by_steps_of_the_configured_fraction_up_to_it() -> None:
    g = governor(0.5, recover_step=0.25)
    g.fraction = 0.1
    assert g.evaluate() == (pytest.approx(0.225), "healthy")
    assert g.evaluate() == (pytest.approx(0.35), "healthy")
    assert g.evaluate() == (pytest.approx(0.475), "healthy")
    assert g.evaluate() == (0.5, "healthy")


def test_counts_start_again_every_interval() -> None:
    g = governor()
    for _ in range(3):
        g.record_shadow(failed=True)
    g.evaluate()
    g.record_shadow(failed=True)
    assert g.evaluate()[1] == "healthy"  # 1 of 1, not 4 of 4
    assert (g.shadow_sent, g.shadow_failed, g.mirrored, g.plain) == (
        0,
        0,
        [0, 0.0, 0, 0],
        [0, 0.0, 0, 0],
    )


def test_records_add_up_per_kind_of_primary() -> None:
    g = governor()
    g.record_primary(0.5, error=True, mirrored=True)
    g.record_primary(0.25, error=False, mirrored=True)
    g.record_primary(0.125, error=True, mirrored=False)
    g.record_primary(None, error=True, mirrored=False)  # failed, without a latency
    g.record_shadow(failed=False)
    g.record_shadow(failed=True)
    assert (g.mirrored, g.plain, g.shadow_sent, g.shadow_failed) == (
        [2, 0.75, 1, 2],  # count, latency sum, failures, latencies
        [2, 0.125, 2, 1],
        2,
        1,
    )


def test_a_primary_failure_without_a_latency_counts_in_the_failure_rate_only() -> None:
    """A request the fallback answered for is the primary's failure, and its time was
    not the primary's: the mean latency is over the answers the primary gave."""
    g = governor(max_latency_increase=0.25, max_error_rate_increase=0.5)
    feed(g, 4, 0.020, mirrored=False)
    feed(g, 4, 0.020, mirrored=True)
    g.record_primary(None, error=True, mirrored=True)  # 20% failed: within 50 points
    assert g.evaluate() == (1.0, "healthy")
    feed(g, 3, 0.500, mirrored=True)  # slower, but three latencies are too few to judge
    for _ in range(4):
        g.record_primary(None, error=True, mirrored=True)
    assert g.evaluate() == (0.5, "primary failing more while shadowing")  # 4 of 7


def test_unmirrored_traffic_sets_the_reference_and_it_is_kept() -> None:
    g = governor()
    feed(g, 3, 0.010, mirrored=False)
    g.evaluate()
    assert g.reference_latency is None
    feed(g, 4, 0.020, mirrored=False, errors=1)
    g.evaluate()
    assert (g.reference_latency, g.reference_error_rate) == (0.020, 0.25)
    g.evaluate()
    assert (g.reference_latency, g.reference_error_rate) == (0.020, 0.25)


def test_mirrored_primaries_much_slower_than_the_reference_back_off() -> None:
    g = governor(max_latency_increase=0.25)
    feed(g, 4, 0.020, mirrored=False)
    feed(g, 4, 0.030, mirrored=True)
    assert g.evaluate() == (0.5, "primary slower while shadowing")


def test_a_little_slower_or_slower_by_less_than_the_minimum_is_healthy() -> None:
    g = governor(max_latency_increase=0.25)
    feed(g, 4, 0.020, mirrored=False)
    feed(g, 4, 0.0249, mirrored=True)  # 24.5% slower
    assert g.evaluate()[1] == "healthy"
    tiny = governor(max_latency_increase=0.25, min_latency_increase="5ms")
    feed(tiny, 4, 0.002, mirrored=False)
    feed(tiny, 4, 0.006, mirrored=True)  # twice as slow, but only by 4 ms
    assert tiny.evaluate()[1] == "healthy"
    enough = governor(max_latency_increase=0.25, min_latency_increase="5ms")
    feed(enough, 4, 0.002, mirrored=False)
    feed(enough, 4, 0.0071, mirrored=True)  # by 5.1 ms
    assert enough.evaluate()[1] == "primary slower while shadowing"


def test_slower_mirrored_primaries_need_enough_samples_and_a_reference() -> None:
    g = governor()
    feed(g, 4, 0.030, mirrored=True)
    assert g.evaluate()[1] == "healthy"  # no reference yet
    few = governor()
    feed(few, 4, 0.020, mirrored=False)
    feed(few, 3, 0.100, mirrored=True)
    assert few.evaluate()[1] == "healthy"


def test_mirrored_primaries_failing_more_back_off() -> None:
    g = governor(max_error_rate_increase=0.05)
    feed(g, 20, 0.020, mirrored=False)  # no errors: the reference rate is 0
    feed(g, 20, 0.020, mirrored=True, errors=2)  # 10%
    assert g.evaluate() == (0.5, "primary failing more while shadowing")
    g2 = governor(max_error_rate_increase=0.25)
    feed(g2, 4, 0.020, mirrored=False, errors=1)  # 25%
    feed(g2, 4, 0.020, mirrored=True, errors=2)  # 50%: exactly 25 points more
    assert g2.evaluate()[1] == "healthy"
    feed(g2, 4, 0.020, mirrored=True, errors=3)
    assert g2.evaluate()[1] == "primary failing more while shadowing"


def test_a_few_errors_within_the_allowed_increase_over_none_are_healthy() -> None:
    g = governor(max_error_rate_increase=0.3)
    feed(g, 10, 0.020, mirrored=False)  # no errors: the reference rate is 0
    feed(g, 10, 0.020, mirrored=True, errors=2)  # 20%: within 0 + 30 points
    assert g.evaluate()[1] == "healthy"


def test_slower_by_exactly_the_minimum_is_healthy() -> None:
    # Exact binary fractions: 0.5 - 0.25 is exactly the 250 ms minimum.
    g = governor(max_latency_increase=0.25, min_latency_increase="250ms")
    feed(g, 4, 0.25, mirrored=False)
    feed(g, 4, 0.5, mirrored=True)
    assert g.evaluate()[1] == "healthy"


def test_a_tiny_fraction_backs_off_to_zero() -> None:
    g = governor(0.004, backoff_factor=0.5)
    fractions = []
    for _ in range(3):
        for _ in range(4):
            g.record_shadow(failed=True)
        fractions.append(g.evaluate()[0])
    assert fractions == [0.002, 0.001, 0.0]


# small parts


async def test_a_ticket_takes_the_first_outcome_only() -> None:
    ticket = ShadowTicket(asyncio.get_running_loop().create_future())
    first = PrimaryOutcome(200, b"{}", 0.01)
    ticket.resolve(first)
    ticket.resolve(None)
    assert ticket.outcome.result() is first


def test_a_stream_capture_keeps_chunks_up_to_its_limit_then_nothing() -> None:
    capture = StreamCapture(limit=6)
    capture.add(b"abc")
    capture.add(b"def")
    assert (capture.chunks, capture.size, capture.overflow) == ([b"abc", b"def"], 6, False)
    capture.add(b"g")
    assert (capture.chunks, capture.overflow) == ([], True)
    capture.add(b"h")
    assert (capture.chunks, capture.size) == ([], 7)


# the mirror


class Log:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def submit(self, record: dict[str, Any]) -> None:
        self.records.append(record)


@pytest.fixture
async def pools() -> AsyncIterator[list[Pool]]:
    made: list[Pool] = []
    yield made
    for pool in made:
        pool.close()


class Mirror:
    def __init__(self, url: str, pools: list[Pool], **settings: Any) -> None:
        values: dict[str, Any] = {"upstream": "candidate", "fraction": 1.0, "timeout": "5s"}
        values.update(settings)
        client = UpstreamClient("candidate", Upstream(url=url))
        parts = urlsplit(url)
        pool = Pool(parts.hostname or LOOPBACK, parts.port or 80)
        pools.append(pool)
        client.attach(pool)
        self.metrics = Metrics()
        self.log = Log()
        self.mirror = ShadowMirror(
            "infer",
            ShadowSettings.model_validate(values),
            client,
            self.metrics,
            self.log,  # type: ignore[arg-type]
        )

    def call(self, body: bytes = b'{"x": 1}', request_id: str = "r-1") -> UpstreamCall:
        headers = Headers([("Content-Type", "application/json")])
        return UpstreamCall("POST", "/infer?v=2", headers, body, request_id)

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"route": "infer", **labels})
        return value or 0.0

    async def run(
        self, primary: PrimaryOutcome | None, body: bytes = b'{"x": 1}'
    ) -> dict[str, Any]:
        ticket = self.mirror.mirror(self.call(body))
        assert ticket is not None
        ticket.resolve(primary)
        await asyncio.wait_for(self.mirror.wait_idle(), 5)
        return self.log.records[-1]


def answering(payload: Any, status: int = 200) -> Any:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            status=status, body=orjson.dumps(payload), content_type="application/json"
        )

    return answer


async def candidate(make_fake_model: MakeFakeModel, payload: Any, status: int = 200) -> FakeModel:
    model = await make_fake_model()
    model.on("/infer", answering(payload, status))
    return model


V2 = {"outputs": [{"name": "p", "data": [0.5, 0.5]}]}


async def test_a_copy_is_sent_marked_as_shadow_and_compared(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, V2)
    m = Mirror(model.url, pools)
    record = await m.run(PrimaryOutcome(200, orjson.dumps(V2), 1.0012345))
    [hit] = model.hits_for("/infer")
    assert (hit.method, hit.target, hit.body) == ("POST", "/infer?v=2", b'{"x": 1}')
    assert hit.headers["x-sidecar-shadow"] == ["1"]
    assert hit.headers["x-request-id"] == ["r-1"]
    assert record["result"] == "match"
    assert record["agreement"] is True
    assert (record["request_id"], record["route"]) == ("r-1", "infer")
    assert (record["primary_status"], record["shadow_status"], record["primary_ms"]) == (
        200,
        200,
        round(1001.2345, 3),
    )
    assert 0 < record["shadow_ms"] < 1000
    assert record["latency_delta_ms"] == pytest.approx(
        record["shadow_ms"] - record["primary_ms"], abs=0.002
    )
    assert record["differences"] == []
    assert m.count("sidecar_shadow_requests_total", outcome="sent") == 1.0
    assert m.count("sidecar_shadow_comparisons_total", result="match") == 1.0
    assert m.count("sidecar_shadow_latency_delta_seconds_count") == 1.0
    assert m.mirror.governor.shadow_sent == 1
    assert m.mirror.governor.shadow_failed == 0
    assert m.mirror.in_flight == 0


async def test_a_different_answer_is_a_mismatch_with_its_differences(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, {"outputs": [{"name": "p", "data": [0.1, 0.9]}]})
    m = Mirror(model.url, pools, compare={"abs_tol": 0.01, "rel_tol": 0.0, "classes": 2})
    record = await m.run(PrimaryOutcome(200, orjson.dumps(V2), 0.001))
    assert (record["result"], record["agreement"], record["reason"]) == (
        "mismatch",
        False,
        "numeric",
    )
    assert record["max_abs_diff"] == pytest.approx(0.4)
    assert record["label_agreement"] == 0.0
    assert record["cosine"] is None
    assert len(record["differences"]) == 2
    assert m.count("sidecar_shadow_comparisons_total", result="mismatch") == 1.0


async def test_a_streamed_primary_is_compared_byte_for_byte(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, V2)
    m = Mirror(model.url, pools)
    record = await m.run(PrimaryOutcome(200, orjson.dumps(V2) + b" ", 0.001, streamed=True))
    assert (record["result"], record["reason"]) == ("mismatch", "stream")


async def test_a_failing_candidate_is_counted_against_the_shadow(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, {"error": "boom"}, status=500)
    m = Mirror(model.url, pools)
    record = await m.run(PrimaryOutcome(200, orjson.dumps(V2), 0.001))
    assert (record["result"], record["reason"], record["shadow_status"]) == (
        "mismatch",
        "status",
        500,
    )
    assert m.mirror.governor.shadow_failed == 1
    ok = await candidate(make_fake_model, {"error": "bad input"}, status=499)
    m2 = Mirror(ok.url, pools)
    await m2.run(PrimaryOutcome(499, b'{"error": "bad input"}', 0.001))
    assert m2.mirror.governor.shadow_failed == 0


async def test_a_candidate_that_is_down_is_an_error_without_a_comparison(
    pools: list[Pool],
) -> None:
    m = Mirror(f"http://{LOOPBACK}:{closed_port()}", pools)
    record = await m.run(PrimaryOutcome(200, orjson.dumps(V2), 0.001))
    assert (record["result"], record["agreement"], record["reason"]) == (
        "error",
        None,
        "shadow error",
    )
    assert record["shadow_status"] is None
    assert 0 <= record["shadow_ms"] < 1000  # how long it took to fail
    assert m.count("sidecar_shadow_requests_total", outcome="error") == 1.0
    assert m.count("sidecar_shadow_comparisons_total", result="error") == 1.0
    assert m.mirror.governor.shadow_failed == 1


async def test_a_candidate_too_slow_times_out(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await make_fake_model()
    gate = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response()

    model.on("/infer", stuck)
    m = Mirror(model.url, pools, timeout="50ms")
    try:
        record = await m.run(PrimaryOutcome(200, orjson.dumps(V2), 0.001))
    finally:
        gate.set()
    assert (record["result"], record["reason"]) == ("error", "shadow timeout")
    assert record["shadow_status"] is None  # no answer, so no status
    assert 40 <= record["shadow_ms"] < 1000  # about the 50 ms it was given
    assert m.count("sidecar_shadow_requests_total", outcome="timeout") == 1.0
    assert m.mirror.governor.shadow_failed == 1


async def test_answers_too_large_to_compare_are_skipped(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    big = {"outputs": [{"name": "p", "data": [0.5] * 400}]}
    model = await candidate(make_fake_model, big)
    m = Mirror(model.url, pools, compare={"max_body_size": "1KiB"})
    record = await m.run(PrimaryOutcome(200, orjson.dumps(big), 0.001))
    assert (record["result"], record["reason"]) == ("skipped", "too large to compare")
    assert record["shadow_status"] == 200
    assert m.count("sidecar_shadow_requests_total", outcome="skipped_too_large") == 1.0
    small = await candidate(make_fake_model, V2)
    m2 = Mirror(small.url, pools)
    record = await m2.run(PrimaryOutcome(200, None, 0.001, reason="too_large"))
    assert (record["result"], record["reason"]) == ("skipped", "too large to compare")
    assert m2.count("sidecar_shadow_requests_total", outcome="skipped_too_large") == 1.0
    assert m2.count("sidecar_shadow_comparisons_total", result="error") == 0.0
    assert m2.count("sidecar_shadow_comparisons_total", result="skipped") == 1.0


async def test_an_answer_exactly_at_the_size_limit_is_compared(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    payload = {"outputs": [{"name": "p", "data": [1]}], "pad": ""}
    size = len(orjson.dumps(payload))
    payload["pad"] = "x" * (1024 - size)
    assert len(orjson.dumps(payload)) == 1024
    model = await candidate(make_fake_model, payload)
    m = Mirror(model.url, pools, compare={"max_body_size": "1KiB"})
    record = await m.run(PrimaryOutcome(200, orjson.dumps(payload), 0.001))
    assert record["result"] == "match"


async def test_without_a_primary_answer_there_is_nothing_to_compare(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, V2)
    m = Mirror(model.url, pools)
    none = await m.run(None)
    assert (none["result"], none["reason"], none["primary_status"], none["primary_ms"]) == (
        "skipped",
        "no primary answer",
        None,
        None,
    )
    fallback = await m.run(PrimaryOutcome(503, None, 0.001, reason="fallback answered"))
    assert (fallback["result"], fallback["reason"]) == ("skipped", "fallback answered")
    # Not the candidate's error: it answered both.
    assert m.count("sidecar_shadow_comparisons_total", result="error") == 0.0
    assert m.count("sidecar_shadow_comparisons_total", result="skipped") == 2.0
    assert m.count("sidecar_shadow_requests_total", outcome="ok") == 0.0


async def test_nothing_is_mirrored_at_fraction_zero(pools: list[Pool]) -> None:
    m = Mirror(f"http://{LOOPBACK}:{closed_port()}", pools, fraction=0.0)
    assert m.mirror.mirror(m.call()) is None
    assert m.mirror.in_flight == 0


async def test_copies_past_the_cap_are_skipped_not_queued(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, V2)
    m = Mirror(model.url, pools, max_in_flight=2)
    first, second = m.mirror.mirror(m.call()), m.mirror.mirror(m.call())
    assert first is not None
    assert second is not None
    assert m.mirror.mirror(m.call()) is None
    assert m.count("sidecar_shadow_requests_total", outcome="skipped_busy") == 1.0
    assert m.mirror.in_flight == 2
    first.resolve(None)
    second.resolve(None)
    await asyncio.wait_for(m.mirror.wait_idle(), 5)
    assert m.mirror.in_flight == 0
    assert m.mirror.mirror(m.call()) is not None
    await m.mirror.stop(drain_within=0.01)


async def test_copies_past_the_bytes_they_may_hold_are_skipped_not_queued(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    # A copy holds the request body until the candidate answers or its timeout: 40
    # bodies of 8 MiB against a candidate taking 3 s took the process from 90 to
    # 419 MB (32 copies' worth) with server.max_buffered_bodies at 16 MiB.
    model = await candidate(make_fake_model, V2)
    m = Mirror(model.url, pools, max_bytes="10KiB")
    body = b"x" * 4096
    first, second = m.mirror.mirror(m.call(body)), m.mirror.mirror(m.call(body))
    assert first is not None
    assert second is not None
    assert m.mirror.copies_out.bytes == 8192
    assert m.mirror.mirror(m.call(body)) is None  # 12 KiB would be out
    assert m.mirror.mirror(m.call(b"x" * 2048)) is not None  # exactly 10 KiB is not past
    assert m.mirror.mirror(m.call(b"{}")) is None
    assert m.count("sidecar_shadow_requests_total", outcome="skipped_busy") == 2.0
    for ticket in (first, second):
        ticket.resolve(None)
    await asyncio.sleep(0)
    await m.mirror.stop(drain_within=5)
    assert m.mirror.copies_out.bytes == 0  # every copy gave its bytes back
    assert m.mirror.mirror(m.call(b"x" * 10240)) is not None
    await m.mirror.stop(drain_within=0.01)
    assert m.mirror.copies_out.bytes == 0
    # A body over max_bytes alone would never fit: too large, not busy.
    assert m.mirror.mirror(m.call(b"x" * 10241)) is None
    assert m.count("sidecar_shadow_requests_total", outcome="skipped_too_large") == 1.0
    assert m.count("sidecar_shadow_requests_total", outcome="skipped_busy") == 2.0


async def test_stop_cancels_copies_still_waiting_for_their_primary(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, V2)
    m = Mirror(model.url, pools)
    assert m.mirror.mirror(m.call()) is not None
    with capture_logs() as logs:
        await m.mirror.stop(drain_within=0.05)
    assert [(e["event"], e["in_flight"]) for e in logs] == [("shadow_copies_cancelled", 1)]
    assert m.mirror.in_flight == 0
    assert m.log.records == []


async def test_govern_sets_the_gauge_and_logs_a_change(pools: list[Pool]) -> None:
    m = Mirror(
        f"http://{LOOPBACK}:{closed_port()}", pools, fraction=0.5, governor={"min_samples": 1}
    )
    assert m.count("sidecar_shadow_fraction") == 0.5
    with capture_logs() as logs:
        assert m.mirror.govern() == 0.5
        m.mirror.governor.record_shadow(failed=True)
        assert m.mirror.govern() == 0.25
    assert m.count("sidecar_shadow_fraction") == 0.25
    assert [(e["event"], e["fraction"], e["previous"], e["reason"]) for e in logs] == [
        ("shadow_fraction_changed", 0.25, 0.5, "shadow failing")
    ]


async def test_a_started_mirror_governs_every_interval(pools: list[Pool]) -> None:
    m = Mirror(
        f"http://{LOOPBACK}:{closed_port()}",
        pools,
        governor={"min_samples": 1, "interval": "10ms"},
    )
    m.mirror.governor.record_shadow(failed=True)
    m.mirror.start()
    try:
        for _ in range(500):
            if m.mirror.governor.fraction < 1.0:
                break
            await asyncio.sleep(0.01)
        assert m.mirror.governor.fraction == 0.5
    finally:
        await m.mirror.stop_governing()


async def test_a_mirror_with_its_governor_off_keeps_its_fraction(
    pools: list[Pool],
) -> None:
    m = Mirror(
        f"http://{LOOPBACK}:{closed_port()}",
        pools,
        governor={"enabled": False, "min_samples": 1, "interval": "10ms"},
    )
    m.mirror.start()
    assert len(m.mirror._governing) == 0
    await m.mirror.stop()


def test_a_shadow_failing_with_more_than_min_samples_backs_off_too() -> None:
    g = governor(max_shadow_failure_rate=0.5)
    for failed in (True, True, True, True, False, False):
        g.record_shadow(failed=failed)
    assert g.evaluate() == (0.5, "shadow failing")


def test_slower_by_more_than_the_minimum_but_within_the_allowed_increase_is_healthy() -> None:
    g = governor(max_latency_increase=0.25, min_latency_increase="5ms")
    feed(g, 4, 0.100, mirrored=False)
    feed(g, 4, 0.120, mirrored=True)  # 20% and 20 ms slower
    assert g.evaluate() == (1.0, "healthy")


def test_a_shadow_failing_less_than_the_limit_is_healthy() -> None:
    g = governor(max_shadow_failure_rate=0.5)
    for failed in (True, False, False, False):
        g.record_shadow(failed=failed)
    assert g.evaluate() == (1.0, "healthy")


async def test_a_candidate_answering_503_counts_as_failing(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, {"error": "busy"}, status=503)
    m = Mirror(model.url, pools)
    await m.run(PrimaryOutcome(200, orjson.dumps(V2), 0.001))
    assert m.mirror.governor.shadow_failed == 1


async def test_a_fraction_change_is_logged_to_four_places(pools: list[Pool]) -> None:
    m = Mirror(
        f"http://{LOOPBACK}:{closed_port()}", pools, fraction=0.12345, governor={"min_samples": 1}
    )
    m.mirror.governor.record_shadow(failed=True)
    with capture_logs() as logs:
        m.mirror.govern()
    assert [(e["fraction"], e["previous"]) for e in logs] == [
        (round(0.12345 / 2, 4), round(0.12345, 4))
    ]


async def test_an_answer_one_byte_over_the_size_limit_is_skipped(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    payload = {"outputs": [{"name": "p", "data": [1]}], "pad": ""}
    payload["pad"] = "x" * (1025 - len(orjson.dumps(payload)))
    assert len(orjson.dumps(payload)) == 1025
    model = await candidate(make_fake_model, payload)
    m = Mirror(model.url, pools, compare={"max_body_size": "1KiB"})
    record = await m.run(PrimaryOutcome(200, b"{}", 0.001))
    assert (record["result"], record["reason"]) == ("skipped", "too large to compare")


# what the answers hold (Content-Encoding), and where they are compared


def test_gzip_and_deflate_answers_are_inflated_up_to_the_limit() -> None:
    text = b"x" * 10_001  # an odd limit: exactly the limit inflates, one byte past does not
    assert decoded(gzip.compress(text), b"gzip", 10_001) == text
    assert decoded(gzip.compress(text), b" X-GZIP ", 10_001) == text
    assert decoded(gzip.compress(text), b"gzip", 10_000) is None
    assert decoded(zlib.compress(b"{}"), b"deflate", 2) == b"{}"
    assert decoded(b"not gzip", b"gzip", 100) is None
    assert decoded(gzip.compress(b"{}")[:-4], b"gzip", 100) is None  # cut short
    assert decoded(b"\x00br", b"br", 1) == b"\x00br"  # a coding zlib does not know: as is
    assert decoded(b"{}" * 100, None, 1) == b"{}" * 100  # not encoded: as is


def gzip_answering(payload: bytes) -> Any:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=payload,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    return answer


async def test_encoded_answers_are_compared_by_what_they_hold(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await make_fake_model()
    model.on("/infer", gzip_answering(gzip.compress(orjson.dumps(V2), compresslevel=1)))
    m = Mirror(model.url, pools)
    primary = gzip.compress(orjson.dumps(V2), compresslevel=9)
    record = await m.run(PrimaryOutcome(200, primary, 0.001, encoding=b"gzip"))
    assert (record["result"], record["agreement"]) == ("match", True)
    plain = await m.run(PrimaryOutcome(200, orjson.dumps(V2), 0.001))  # one side encoded
    assert plain["result"] == "match"
    broken = await candidate(make_fake_model, V2)
    m2 = Mirror(broken.url, pools)
    record = await m2.run(PrimaryOutcome(200, b"not gzip", 0.001, encoding=b"gzip"))
    assert (record["result"], record["agreement"], record["reason"]) == (
        "error",
        None,
        "an answer's content encoding could not be undone",
    )
    assert m2.count("sidecar_shadow_comparisons_total", result="error") == 1.0


async def test_answers_over_64_kib_together_or_encoded_are_compared_off_the_loop(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    """Reading every number is Python work that would hold up every primary request:
    answers over 64 KiB together, and encoded ones (they may inflate to max_body_size),
    are compared in a thread; smaller plain ones on the loop, where it costs less."""
    shadow_body = orjson.dumps(V2)
    model = await make_fake_model()
    model.on("/infer", answering(V2))
    model.on("/gzip", gzip_answering(gzip.compress(shadow_body)))
    m = Mirror(model.url, pools, compare={"max_body_size": "1MiB"})
    compared_on: list[bool] = []  # on the loop's thread
    compare = m.mirror._comparer.compare
    loop_thread = threading.get_ident()

    def recording(*args: Any, **kwargs: Any) -> Comparison:
        compared_on.append(threading.get_ident() == loop_thread)
        return compare(*args, **kwargs)

    m.mirror._comparer.compare = recording  # type: ignore[method-assign]
    inline = 64 * 1024 - len(shadow_body)  # the primary's size that makes 64 KiB together
    for size in (inline - 1, inline, inline + 1, 32 * 1024):
        primary = shadow_body + b" " * (size - len(shadow_body))  # the same numbers
        await m.run(PrimaryOutcome(200, primary, 0.001))
    ticket = m.mirror.mirror(UpstreamCall("POST", "/gzip", Headers([]), b"{}", "r-2"))
    assert ticket is not None
    ticket.resolve(PrimaryOutcome(200, shadow_body, 0.001))
    await asyncio.wait_for(m.mirror.wait_idle(), 5)
    await m.run(PrimaryOutcome(200, gzip.compress(shadow_body), 0.001, encoding=b"gzip"))
    assert compared_on == [True, True, False, True, False, False]
    assert [r["result"] for r in m.log.records] == ["match"] * 6


def test_the_reference_is_set_from_more_than_min_samples_too() -> None:
    g = governor(max_latency_increase=0.25)
    feed(g, 6, 0.020, mirrored=False, errors=3)
    feed(g, 6, 0.030, mirrored=True)
    assert g.evaluate() == (0.5, "primary slower while shadowing")
    assert (g.reference_latency, g.reference_error_rate) == (0.020, 0.5)


def test_the_reference_failure_rate_counts_failures_without_a_latency() -> None:
    """Four unmirrored requests, one of which the fallback answered for: enough for a
    failure rate (1 in 4), not for a mean latency (three answers)."""
    g = governor()
    feed(g, 3, 0.020, mirrored=False)
    g.record_primary(None, error=True, mirrored=False)
    g.evaluate()
    assert (g.reference_latency, g.reference_error_rate) == (None, 0.25)


def test_the_cap_holds_for_copies_a_reloaded_mirror_left_out(
    pools: list[Pool],
) -> None:
    """A reload that lowers max_in_flight: the new mirror counts the retired one's copies
    still out, and skips while they are more than its cap."""
    m = Mirror(f"http://{LOOPBACK}:{closed_port()}", pools, max_in_flight=3)
    m.mirror.copies_out.count = 3  # the retired mirror's copies, still out
    lowered = ShadowMirror(
        "infer",
        ShadowSettings.model_validate(
            {"upstream": "candidate", "fraction": 1.0, "max_in_flight": 2}
        ),
        m.mirror.upstream,
        m.metrics,
        None,
        copies_out=m.mirror.copies_out,
    )
    assert lowered.mirror(m.call()) is None
    assert m.count("sidecar_shadow_requests_total", outcome="skipped_busy") == 1.0


def test_a_governor_for_another_primary_keeps_the_fraction_not_the_references() -> None:
    g = governor(0.5, max_shadow_failure_rate=0.5, recover_step=1.0)
    feed(g, 4, 0.020, mirrored=False, errors=1)
    for _ in range(4):
        g.record_shadow(failed=True)
    assert g.evaluate() == (0.25, "shadow failing")
    g.record_shadow(failed=True)
    fresh = Governor.with_fraction_of(g)
    assert (fresh.configured, fresh.fraction, fresh.settings) == (0.5, 0.25, g.settings)
    assert (fresh.reference_latency, fresh.reference_error_rate) == (None, None)
    assert (fresh.shadow_sent, fresh.mirrored, fresh.plain) == (0, [0, 0.0, 0, 0], [0, 0.0, 0, 0])
    assert fresh.evaluate() == (0.5, "healthy")  # recovers up to the configured 0.5


async def test_a_carried_governor_is_governed_from_the_swap_not_from_start(
    pools: list[Pool],
) -> None:
    """A reload that leaves the shadow alone carries its governor on: the new mirror
    shows its fraction, and governs it once in service (the retired mirror governs it
    until then: two at once would each judge a share of the interval's samples)."""
    m = Mirror(f"http://{LOOPBACK}:{closed_port()}", pools, governor={"interval": "10ms"})
    m.mirror.governor.fraction = 0.25
    metrics = Metrics()
    carried = ShadowMirror(
        "infer",
        m.mirror.settings,
        m.mirror.upstream,
        metrics,
        None,
        governor=m.mirror.governor,
    )
    assert carried.governor is m.mirror.governor
    assert metrics.registry.get_sample_value("sidecar_shadow_fraction", {"route": "infer"}) == 0.25
    carried.start()
    assert len(carried._governing) == 0
    carried.start_governing()
    assert len(carried._governing) == 1
    await carried.stop_governing()
    assert len(carried._governing) == 0
    m.mirror.start()  # a mirror of its own governor governs from the start
    assert len(m.mirror._governing) == 1
    await m.mirror.stop()
    assert len(m.mirror._governing) == 0


async def test_the_log_names_no_primary_status_or_time_the_primary_did_not_have(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, V2)
    m = Mirror(model.url, pools)
    failed = await m.run(PrimaryOutcome(0, None, None, reason="primary failed"))
    assert (failed["primary_status"], failed["primary_ms"], failed["result"]) == (
        None,
        None,
        "skipped",
    )
    assert failed["reason"] == "primary failed"
    # A body without the model's time (none measured): compared, without a delta.
    untimed = await m.run(PrimaryOutcome(200, orjson.dumps(V2), None))
    assert (untimed["result"], untimed["primary_ms"], untimed["latency_delta_ms"]) == (
        "match",
        None,
        None,
    )
    assert m.count("sidecar_shadow_latency_delta_seconds_count") == 0.0


@pytest.mark.parametrize("answer", ["answered", "down", "too slow"])
async def test_the_shadows_time_is_logged_to_the_microsecond_on_any_clock_reading(
    make_fake_model: MakeFakeModel,
    pools: list[Pool],
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
) -> None:
    """A monotonic clock may start anywhere: the copy's time is what passed between
    sending it and its answer (or its failure), whatever the clock read when sent."""
    import time
    from types import SimpleNamespace

    from sidecar.upstream import shadow

    gate = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response()

    model = await candidate(make_fake_model, V2)
    if answer == "too slow":
        model.on("/infer", stuck)
    url = f"http://{LOOPBACK}:{closed_port()}" if answer == "down" else model.url
    readings = iter([0.5, 1.7012345])  # sent, answered (or gave up): 1.2012345 s
    clock = SimpleNamespace(perf_counter=lambda: next(readings), time=time.time)
    monkeypatch.setattr(shadow, "time", clock)
    m = Mirror(url, pools, timeout="50ms")
    try:
        record = await m.run(PrimaryOutcome(200, orjson.dumps(V2), 1.0))
    finally:
        gate.set()
    assert record["shadow_ms"] == round(1201.2345, 3)
    if answer == "answered":
        assert record["latency_delta_ms"] == round(201.2345, 3)
    else:
        assert record["reason"] == {"down": "shadow error", "too slow": "shadow timeout"}[answer]


def test_a_gzip_bomb_is_not_inflated_past_the_limit() -> None:
    """An answer of a few KiB that inflates to 16 MiB: decoding stops at the comparison's
    limit, so the copy never holds more than that (here under 1 MiB at the peak)."""
    import tracemalloc

    bomb = gzip.compress(bytes(16 * 1024 * 1024))
    tracemalloc.start()
    try:
        assert decoded(bomb, b"gzip", 64 * 1024) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


async def test_a_recovering_fraction_is_logged_too(pools: list[Pool]) -> None:
    m = Mirror(
        f"http://{LOOPBACK}:{closed_port()}",
        pools,
        fraction=0.5,
        governor={"min_samples": 1, "recover_step": 1.0},
    )
    m.mirror.governor.record_shadow(failed=True)
    with capture_logs() as logs:
        assert m.mirror.govern() == 0.25
        assert m.mirror.govern() == 0.5
        assert m.mirror.govern() == 0.5  # unchanged: nothing to say
    assert [(e["fraction"], e["previous"], e["reason"]) for e in logs] == [
        (0.25, 0.5, "shadow failing"),
        (0.5, 0.25, "healthy"),
    ]
    assert m.count("sidecar_shadow_fraction") == 0.5


def test_slower_by_exactly_the_allowed_increase_is_healthy() -> None:
    # Exact binary fractions: 0.3125 is exactly 1.25 times 0.25.
    g = governor(max_latency_increase=0.25, min_latency_increase="5ms")
    feed(g, 4, 0.25, mirrored=False)
    feed(g, 4, 0.3125, mirrored=True)
    assert g.evaluate() == (1.0, "healthy")


def test_the_mirrored_failure_rate_is_over_every_mirrored_request() -> None:
    """Two of eight mirrored requests failed without an answer (the fallback answered):
    25%, within the 30 points allowed, not two of the six that had a latency."""
    g = governor(max_error_rate_increase=0.3)
    feed(g, 8, 0.020, mirrored=False)
    feed(g, 6, 0.020, mirrored=True)
    for _ in range(2):
        g.record_primary(None, error=True, mirrored=True)
    assert g.evaluate() == (1.0, "healthy")


async def test_a_finished_copy_frees_exactly_its_place_under_the_cap(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, V2)
    m = Mirror(model.url, pools, max_in_flight=1)
    for _ in range(3):  # each copy, once compared, leaves room for one more, not two
        ticket = m.mirror.mirror(m.call())
        assert ticket is not None
        assert m.mirror.mirror(m.call()) is None
        ticket.resolve(None)
        await asyncio.wait_for(m.mirror.wait_idle(), 5)
        assert m.mirror.copies_out.count == 0
    assert m.count("sidecar_shadow_requests_total", outcome="skipped_busy") == 3.0


async def test_the_mirror_is_idle_only_once_every_copy_is_done(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await candidate(make_fake_model, V2)
    m = Mirror(model.url, pools)
    first, second = m.mirror.mirror(m.call()), m.mirror.mirror(m.call())
    assert first is not None
    assert second is not None
    first.resolve(None)
    for _ in range(500):  # until the first copy is compared and done
        if m.log.records:
            break
        await asyncio.sleep(0.01)
    assert (len(m.log.records), m.mirror.in_flight) == (1, 1)
    with pytest.raises(TimeoutError):  # the second still waits for its primary
        await asyncio.wait_for(m.mirror.wait_idle(), 0.05)
    second.resolve(None)
    await asyncio.wait_for(m.mirror.wait_idle(), 5)
    assert len(m.log.records) == 2
