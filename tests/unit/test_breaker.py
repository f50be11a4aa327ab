"""sidecar.upstream.breaker: the circuit per upstream, driven directly on a fake clock."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from sidecar.config.schema import BreakerSettings
from sidecar.http import errors
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.breaker import BreakerFailure, UpstreamBreaker
from tests.conftest import FakeClock


class Boom(Exception):
    pass


def breaker(
    clock: FakeClock, *, failures: int = 3, reset: float = 10.0, probes: int = 1
) -> UpstreamBreaker:
    settings = BreakerSettings(
        failures=failures, reset_timeout=f"{reset}s", half_open_probes=probes
    )
    return UpstreamBreaker("model", settings, Metrics(), clock=clock)


def state_metric(b: UpstreamBreaker) -> float | None:
    return b._metrics.registry.get_sample_value("sidecar_circuit_state", {"upstream": "model"})


def transitions(b: UpstreamBreaker, old: str, new: str) -> float | None:
    return b._metrics.registry.get_sample_value(
        "sidecar_circuit_transitions_total",
        {"upstream": "model", "from_state": old, "to_state": new},
    )


async def ok(probe: bool) -> str:
    return "probe" if probe else "plain"


async def fail(probe: bool) -> str:
    raise BreakerFailure(Boom())


async def failures(b: UpstreamBreaker, count: int) -> None:
    for _ in range(count):
        with pytest.raises(BreakerFailure):
            await b.call(fail)


async def trip(b: UpstreamBreaker, clock: FakeClock) -> None:
    await failures(b, b.settings.failures)
    assert b.state == "open"


async def test_a_new_circuit_is_closed_and_lets_requests_through() -> None:
    b = breaker(FakeClock())
    assert (b.state, state_metric(b)) == ("closed", None)  # not in service yet
    b.publish()  # put in service
    assert (b.state, state_metric(b)) == ("closed", 0.0)
    assert await b.call(ok) == "plain"


async def test_the_circuit_opens_on_the_configured_run_of_failures() -> None:
    b = breaker(FakeClock(), failures=3)
    await failures(b, 2)
    assert b.state == "closed"
    with pytest.raises(BreakerFailure) as tripped:  # the tripping request keeps its error
        await b.call(fail)
    assert isinstance(tripped.value.cause, Boom)
    assert (b.state, state_metric(b)) == ("open", 2.0)
    assert transitions(b, "closed", "open") == 1.0


async def test_a_success_resets_the_run_of_failures() -> None:
    b = breaker(FakeClock(), failures=3)
    await failures(b, 2)
    await b.call(ok)
    await failures(b, 2)
    assert b.state == "closed"
    await failures(b, 1)
    assert b.state == "open"


async def test_other_errors_do_not_count_as_failures() -> None:
    b = breaker(FakeClock(), failures=1)

    async def broken(probe: bool) -> str:
        raise Boom("not the upstream's fault")

    for _ in range(3):
        with pytest.raises(Boom):
            await b.call(broken)
    assert b.state == "closed"


async def test_an_open_circuit_refuses_without_calling_until_the_reset_timeout() -> None:
    clock = FakeClock()
    b = breaker(clock, reset=10.0)
    await trip(b, clock)
    called: list[bool] = []

    async def attempt(probe: bool) -> str:
        called.append(probe)
        return "answered"

    clock.advance(9.5)
    with pytest.raises(errors.CircuitOpen, match="'model' is open"):
        await b.call(attempt)
    assert called == []
    clock.advance(0.5)  # exactly the reset timeout
    assert await b.call(attempt) == "answered"
    assert called == [True]  # the first request after the timeout is a probe
    assert (b.state, state_metric(b)) == ("closed", 0.0)
    assert transitions(b, "open", "half-open") == 1.0
    assert transitions(b, "half-open", "closed") == 1.0


async def test_a_failed_probe_reopens_the_circuit_for_another_reset_timeout() -> None:
    clock = FakeClock()
    b = breaker(clock, reset=10.0)
    await trip(b, clock)
    clock.advance(10.0)
    with pytest.raises(BreakerFailure):  # the probe's own failure, not pybreaker's
        await b.call(fail)
    assert (b.state, state_metric(b)) == ("open", 2.0)
    assert transitions(b, "half-open", "open") == 1.0
    clock.advance(9.0)
    with pytest.raises(errors.CircuitOpen):
        await b.call(ok)
    clock.advance(1.0)
    assert await b.call(ok) == "probe"


async def test_half_open_lets_only_the_configured_number_of_probes_through() -> None:
    clock = FakeClock()
    b = breaker(clock, probes=2)
    await trip(b, clock)
    clock.advance(10.0)
    release = asyncio.Event()
    started = 0

    async def slow(probe: bool) -> bool:
        nonlocal started
        started += 1
        await release.wait()
        return probe

    first = asyncio.ensure_future(b.call(slow))
    second = asyncio.ensure_future(b.call(slow))
    for _ in range(100):
        if started == 2:
            break
        await asyncio.sleep(0)
    assert started == 2
    assert (b.state, state_metric(b)) == ("half-open", 1.0)
    assert transitions(b, "open", "half-open") == 1.0
    assert transitions(b, "half-open", "half-open") is None  # the second probe moved nothing
    with pytest.raises(errors.CircuitOpen, match="probes are busy"):
        await b.call(ok)
    release.set()
    assert await asyncio.gather(first, second) == [True, True]
    assert b.state == "closed"


async def test_a_probe_that_ends_frees_its_slot_whatever_its_outcome() -> None:
    clock = FakeClock()
    b = breaker(clock, probes=1)
    await trip(b, clock)
    clock.advance(10.0)

    async def broken(probe: bool) -> str:
        raise Boom("no verdict")

    with pytest.raises(Boom):
        await b.call(broken)
    assert b.state == "half-open"  # no verdict either way
    with pytest.raises(Boom):
        await b.call(broken)
    assert await b.call(ok) == "probe"
    assert b.state == "closed"


async def test_a_cancelled_probe_leaves_the_circuit_half_open_for_the_next_request() -> None:
    clock = FakeClock()
    b = breaker(clock)
    await trip(b, clock)
    clock.advance(10.0)
    entered = asyncio.Event()

    async def hang(probe: bool) -> str:
        entered.set()
        await asyncio.Event().wait()
        return "never"

    task = asyncio.ensure_future(b.call(hang))
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.state == "half-open"
    assert await b.call(ok) == "probe"


async def test_a_deferred_outcome_counts_when_it_is_settled_not_when_the_block_ends() -> None:
    """A stream's attempt defers its outcome to the stream's end: its head alone is
    no success (which reset the run of failures before), and a probe's slot is freed
    when the block ends."""
    clock = FakeClock()
    b = breaker(clock, failures=2)

    def streamed() -> bool:
        with b.attempt() as probe:
            b.defer()
        return probe

    await failures(b, 1)
    b.settle_late(streamed(), failed=True)
    assert b.state == "open"  # two failures in a row, a head between them
    clock.advance(10.0)
    first, second = streamed(), streamed()  # the slot is freed as each block ends
    assert (first, second) == (True, True)
    assert b.state == "half-open"
    b.settle_late(first, failed=False)
    assert b.state == "closed"
    b.settle_late(streamed(), failed=False)  # a success: nothing to reset, stays closed
    assert b.state == "closed"
    b.settle_late(streamed(), failed=True)
    assert b.state == "closed"  # one failure of two
    with b.attempt():
        pass  # not deferred: a success at once, the run reset
    b.settle_late(streamed(), failed=True)
    assert b.state == "closed"


async def test_a_late_outcome_from_before_the_trip_changes_nothing() -> None:
    clock = FakeClock()
    b = breaker(clock, failures=2, reset=10.0)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow_failure(probe: bool) -> str:
        entered.set()
        await release.wait()
        raise BreakerFailure(Boom())

    async def slow_success(probe: bool) -> str:
        entered.set()
        await release.wait()
        return "late"

    late_failure = asyncio.ensure_future(b.call(slow_failure))
    await asyncio.wait_for(entered.wait(), 5)
    entered.clear()
    late_success = asyncio.ensure_future(b.call(slow_success))
    await asyncio.wait_for(entered.wait(), 5)
    await trip(b, clock)
    clock.advance(5.0)
    release.set()
    with pytest.raises(BreakerFailure):
        await late_failure
    assert await late_success == "late"
    assert b.state == "open"  # not closed by the late success
    assert transitions(b, "closed", "open") == 1.0
    clock.advance(5.0)  # the open period counts from the trip, not from the late failure
    assert await b.call(ok) == "probe"


async def test_force_state_takes_a_state_decided_elsewhere() -> None:
    b = breaker(FakeClock())
    b.force_state("open")
    assert (b.state, state_metric(b)) == ("open", 2.0)
    b.force_state("half-open")
    assert (b.state, state_metric(b)) == ("half-open", 1.0)
    b.force_state("closed")
    assert (b.state, state_metric(b)) == ("closed", 0.0)
    b.force_state("unknown")
    assert b.state == "closed"


async def test_a_forced_open_circuit_waits_its_reset_timeout_on_this_clock() -> None:
    clock = FakeClock()
    b = breaker(clock, reset=10.0)
    b.force_state("open")
    clock.advance(9.0)
    with pytest.raises(errors.CircuitOpen):
        await b.call(ok)


async def test_a_passing_health_probe_half_opens_a_circuit_past_its_reset_timeout() -> None:
    clock = FakeClock()
    b = breaker(clock, reset=10.0)
    b.probe_passed()
    assert b.state == "closed"
    await trip(b, clock)
    clock.advance(9.0)
    b.probe_passed()
    assert b.state == "open"
    clock.advance(1.0)
    b.probe_passed()
    assert (b.state, state_metric(b)) == ("half-open", 1.0)
    b.probe_passed()
    assert b.state == "half-open"


async def test_a_state_read_back_from_shared_state_is_taken_like_a_literal_one() -> None:
    b = breaker(FakeClock())
    decoded = b"open".decode()  # as read from another replica: not the same str object
    b.force_state(decoded)
    assert b.state == "open"
    b.force_state(b"half-open".decode())
    assert b.state == "half-open"
    b.force_state(b"closed".decode())
    assert b.state == "closed"


async def test_a_state_it_does_not_know_changes_nothing() -> None:
    b = breaker(FakeClock())
    b.force_state("open")
    for unknown in ("", "ajar", "Closed", "zz"):
        b.force_state(unknown)
        assert b.state == "open", unknown


async def test_a_circuit_forced_half_open_right_after_a_trip_lets_a_probe_through() -> None:
    clock = FakeClock()
    b = breaker(clock, reset=10.0)
    await trip(b, clock)
    b.force_state("half-open")  # another replica's probe is under way
    assert await b.call(ok) == "probe"


async def test_the_reset_timeout_counts_from_the_trip_on_any_clock_reading() -> None:
    clock = FakeClock()
    clock.now = 1.0  # a monotonic clock may start anywhere
    b = breaker(clock, reset=10.0)
    await trip(b, clock)
    clock.advance(15.0)
    b.probe_passed()
    assert b.state == "half-open"
    b.force_state("open")
    clock.advance(25.0)
    assert await b.call(ok) == "probe"


async def test_well_past_the_reset_timeout_the_next_request_probes() -> None:
    clock = FakeClock()
    b = breaker(clock, reset=10.0)
    await trip(b, clock)
    clock.advance(15.0)
    assert await b.call(ok) == "probe"


async def test_well_past_the_reset_timeout_a_passing_health_probe_half_opens() -> None:
    clock = FakeClock()
    b = breaker(clock, reset=10.0)
    await trip(b, clock)
    clock.advance(15.0)
    b.probe_passed()
    assert b.state == "half-open"


async def test_a_passing_health_probe_leaves_a_recovered_circuit_closed() -> None:
    clock = FakeClock()
    b = breaker(clock, reset=10.0)
    await trip(b, clock)
    clock.advance(10.0)
    assert await b.call(ok) == "probe"
    b.probe_passed()
    assert b.state == "closed"
    b.force_state("half-open")
    b.probe_passed()
    assert b.state == "half-open"


async def test_after_a_failed_probe_still_only_one_probe_at_a_time() -> None:
    clock = FakeClock()
    b = breaker(clock, reset=10.0, probes=1)
    await trip(b, clock)
    clock.advance(10.0)
    with pytest.raises(BreakerFailure):
        await b.call(fail)
    clock.advance(10.0)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(probe: bool) -> bool:
        entered.set()
        await release.wait()
        return probe

    first = asyncio.ensure_future(b.call(slow))
    await asyncio.wait_for(entered.wait(), 5)
    with pytest.raises(errors.CircuitOpen, match="probes are busy"):
        await b.call(ok)
    release.set()
    assert await first is True


async def test_a_probe_failing_after_another_probe_closed_the_circuit_changes_nothing() -> None:
    clock = FakeClock()
    b = breaker(clock, failures=1, probes=2)
    await trip(b, clock)
    clock.advance(10.0)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow_failure(probe: bool) -> str:
        entered.set()
        await release.wait()
        raise BreakerFailure(Boom())

    late = asyncio.ensure_future(b.call(slow_failure))
    await asyncio.wait_for(entered.wait(), 5)
    assert await b.call(ok) == "probe"
    assert b.state == "closed"
    release.set()
    with pytest.raises(BreakerFailure):
        await late
    assert b.state == "closed"


async def test_a_retired_breaker_decides_its_requests_but_shows_nothing() -> None:
    """A reload replaced its runtime: the requests that runtime finishes still go
    through this breaker, but the gauge, the transitions and the log are the breaker
    in service's."""
    clock = FakeClock()
    b = breaker(clock, failures=1, reset=10.0)
    b.publish()
    b.retire()
    with capture_logs() as logs:
        await trip(b, clock)
    assert (b.state, state_metric(b)) == ("open", 0.0)
    assert transitions(b, "closed", "open") is None
    assert logs == []
    clock.advance(9.0)
    with pytest.raises(errors.CircuitOpen):  # its open period still counts
        await b.call(ok)
    clock.advance(1.0)
    assert await b.call(ok) == "probe"
    assert (b.state, state_metric(b)) == ("closed", 0.0)
