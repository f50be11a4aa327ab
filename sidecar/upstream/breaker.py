"""A circuit breaker per upstream, built on pybreaker, with a bounded half-open state.

pybreaker counts consecutive failures and opens; after ``reset_timeout`` the next
call runs in half-open and its result closes or re-opens the circuit. Two things
are added here for asyncio:

* pybreaker lets *every* concurrent caller through in half-open; here at most
  ``half_open_probes`` requests probe at once and everyone else is refused (and so
  gets the fallback), so a recovering model is not hit by the whole backlog.
* pybreaker is told an outcome after the call instead of being wrapped around the
  await (a fifth of the cost), and only ``BreakerFailure`` counts as a failure. A
  cancelled request says nothing either way: pybreaker would take an excluded
  exception for a success, so a cancelled half-open probe would close the circuit.
  Here it leaves the circuit half-open, and the next request probes.
* An outcome arriving after the circuit left the state it started in is dropped, so
  a slow request from before a trip neither extends the open period nor ends it.
* ``probe_passed()``: a passing health probe moves an open circuit whose reset
  timeout is over to half-open, so readiness never waits on a circuit that only a
  request could close.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar, cast

import pybreaker
import structlog

from sidecar.config.schema import BreakerSettings
from sidecar.http import errors
from sidecar.telemetry.metrics import Metrics

log: Final = structlog.get_logger("sidecar.upstream.breaker")

T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
# sidecar_circuit_state values: the higher, the worse.
STATE_VALUES: Final = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class BreakerFailure(Exception):
    """Raised inside the breaker for an outcome that counts as the upstream failing.

    ``cause`` is what the caller acts on afterwards (a ``SidecarError``, or the
    model's own 5xx response, which still passes through or falls back).
    """

    def __init__(self, cause: Any) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


def _not_a_failure(exc: BaseException) -> bool:
    return not isinstance(exc, BreakerFailure)


# pybreaker treats an excluded exception as a success; these must never count.
_EXCLUDED: list[Any] = [asyncio.CancelledError, _not_a_failure]


class _StateListener:
    """A pybreaker listener by its methods (a compiled class may not extend an
    interpreted one): only state changes are ours to hear."""

    def __init__(self, owner: UpstreamBreaker) -> None:
        self._owner = owner

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def failure(self, cb: Any, exc: BaseException) -> None:
        pass

    def success(self, cb: Any) -> None:
        pass

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else "none"
        self._owner._on_state_change(old, new_state.name)


class UpstreamBreaker:
    def __init__(
        self,
        upstream: str,
        settings: BreakerSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.settings = settings
        self._metrics = metrics
        self._clock = clock
        self._opened_at: float | None = None
        self._probes_in_flight = 0
        self._state: str = CLOSED
        # A failure was reported since the last success: pybreaker's count may be
        # above zero, and a success must reset it. Kept here because pybreaker's
        # fail_counter is two interpreted calls, and every request would ask.
        self._failures_reported = False
        # The attempt whose block is ending reports nothing: its answer, a stream,
        # reports when it ends (``defer``, ``settle_late``).
        self._deferred = False
        self._closed_attempt = Attempt(self, probe=False)
        self._probe_attempt = Attempt(self, probe=True)
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=settings.failures,
            # The reset timeout is enforced by _admit() on an injectable monotonic
            # clock; pybreaker's own check (on the wall clock) is switched off.
            reset_timeout=0,
            exclude=_EXCLUDED,
            listeners=[cast(pybreaker.CircuitBreakerListener, _StateListener(self))],
            throw_new_error_on_trip=False,  # the tripping request keeps its own error
            name=upstream,
        )
        self._state = str(self._breaker.current_state)
        # A breaker of a runtime retired by a reload still serves the requests that
        # runtime finishes, but the metrics show the breaker in service.
        # It reaches the gauge once put in service (``publish``): a reload's breaker,
        # built and probed before the swap, must not show closed over an open one.
        self._retired = False

    @property
    def state(self) -> str:
        return self._state

    def retire(self) -> None:
        """Its runtime was replaced: its changes no longer reach the metrics or the log."""
        self._retired = True

    def publish(self) -> None:
        """Show this breaker's state (it has just been put in service)."""
        self._metrics.circuit_state.labels(self.upstream).set(STATE_VALUES[self._state])

    def _on_state_change(self, old: str, new: str) -> None:
        # Every transition comes here (pybreaker notifies each new state object),
        # so the state is kept rather than asked of pybreaker's properties per request.
        self._state = new
        if new == OPEN:
            self._opened_at = self._clock()
        if self._retired:
            return
        self._metrics.circuit_state.labels(self.upstream).set(STATE_VALUES[new])
        self._metrics.circuit_transitions.labels(self.upstream, old, new).inc()
        log.warning("circuit_state_changed", upstream=self.upstream, old=old, new=new)

    def force_state(self, state: str) -> None:
        """Take a state decided elsewhere (another replica, via shared state)."""
        if state == OPEN:
            self._breaker.open()
        elif state == CLOSED:
            self._breaker.close()
        elif state == HALF_OPEN:
            self._breaker.half_open()

    def _report(self, failure: BreakerFailure | None, started_in: str) -> None:
        if self.state != started_in:
            return
        if failure is not None:
            self._failures_reported = True
        try:
            with self._breaker.calling():
                if failure is not None:
                    raise failure
        except BreakerFailure:
            pass  # counted (and maybe tripped the circuit); the caller re-raises it
        except pybreaker.CircuitBreakerError:
            pass  # the report itself re-opened it

    def _admit(self) -> bool:
        """Let a request through (True if it is a half-open probe) or raise CircuitOpen."""
        state = self.state
        if state == CLOSED:
            return False
        if state == OPEN and (
            self._opened_at is not None
            and self._clock() - self._opened_at < self.settings.reset_timeout
        ):
            raise errors.CircuitOpen(f"circuit for upstream {self.upstream!r} is open")
        if self._probes_in_flight >= self.settings.half_open_probes:
            raise errors.CircuitOpen(
                f"circuit for upstream {self.upstream!r} is half-open and its probes are busy"
            )
        if state == OPEN:
            self._breaker.half_open()
        self._probes_in_flight += 1
        return True

    def probe_passed(self) -> None:
        """The upstream's health probe passed: an open circuit past its reset timeout
        lets the next request through to find out (half-open)."""
        if (
            self.state == OPEN
            and self._opened_at is not None
            and self._clock() - self._opened_at >= self.settings.reset_timeout
        ):
            self._breaker.half_open()

    def attempt(self) -> Attempt:
        """One request under the breaker, as a ``with`` block around it::

            with breaker.attempt() as probe:   # CircuitOpen while the circuit is open
                answer = await send(probe)     # BreakerFailure counts against it

        ``probe`` is True for a half-open probe. Only ``BreakerFailure`` leaving the
        block counts as a failure, and an answer as a success; a cancelled request
        or any other error says nothing either way. A block, not a wrapper around a
        callable: two coroutines and a closure fewer per request."""
        return self._probe_attempt if self._admit() else self._closed_attempt

    async def call(self, attempt: Callable[[bool], Awaitable[T]]) -> T:
        """Run ``attempt(is_probe)`` under the breaker (``attempt()``'s block)."""
        with self.attempt() as probe:
            return await attempt(probe)

    def defer(self) -> None:
        """The last step of an attempt's block whose answer is relayed as it comes:
        the block's exit reports nothing (a probe's slot is freed all the same), and
        the caller reports the outcome when the answer has ended (``settle_late``). A
        stream the model breaks off after its head is the model failing; its head
        alone, reported as a success, reset the count of failures before it. Nothing
        may be awaited between this call and the end of the block."""
        self._deferred = True

    def settle_late(self, probe: bool, failed: bool) -> None:
        """The outcome of an attempt whose block deferred it (``defer``): the answer
        ended whole, or the model cut it short (broke it off, went silent). A client
        that left says nothing: do not call this then."""
        failure = BreakerFailure(RuntimeError("the answer was cut short")) if failed else None
        self._outcome(probe, failure)

    def _settle(self, probe: bool, failure: BaseException | None) -> None:
        if probe:
            self._probes_in_flight -= 1
        if self._deferred:
            self._deferred = False
            return
        self._outcome(probe, failure)

    def _outcome(self, probe: bool, failure: BaseException | None) -> None:
        """The outcome of an attempt that got through: reported while the circuit is
        still in the state it started in (a late result from before a trip must not
        extend or end the open period); a run of failures is reset by a success."""
        if isinstance(failure, BreakerFailure):
            self._report(failure, HALF_OPEN if probe else CLOSED)
        elif failure is None:
            if probe:
                self._report(None, HALF_OPEN)  # the model answered: closed
            elif self._failures_reported:
                self._failures_reported = False
                self._report(None, CLOSED)


class Attempt:
    """The ``with`` block of one attempt (``UpstreamBreaker.attempt``): two per
    breaker, made once, one for the closed circuit and one for probes."""

    __slots__ = ("_breaker", "_probe")

    def __init__(self, breaker: UpstreamBreaker, probe: bool) -> None:
        self._breaker = breaker
        self._probe = probe

    def __enter__(self) -> bool:
        return self._probe

    def __exit__(self, kind: object, failure: BaseException | None, trace: object) -> None:
        self._breaker._settle(self._probe, failure)
