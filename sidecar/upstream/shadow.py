"""Shadow traffic: a sampled copy of real requests to a candidate model, compared with
production's answer, and unable to hurt production.

On the request path a route's mirror only decides (a hash of the request id against
the governed fraction, and a cap on copies in flight: past it the copy is skipped and
counted, never queued) and starts a background task. The copy carries
``X-Sidecar-Shadow: 1`` and the same ``X-Request-ID``; its answer never reaches the
client. Once both answers are in, the task compares them (``sidecar.analytics.compare``),
counts, and writes one line to the comparison log. The primary path never waits for
the shadow: it only hands over its own outcome when it has one.

The governor lowers the fraction when the shadow keeps failing, or when primary
requests that were mirrored are slower or fail more than those that were not (or
than before shadowing), and raises it again step by step once things are healthy.
"""

from __future__ import annotations

import asyncio
import functools
import time
import zlib
from dataclasses import dataclass, field

import structlog

from sidecar.analytics.compare import Comparer, Comparison
from sidecar.analytics.sampling import sampled
from sidecar.background import BackgroundTasks
from sidecar.config.schema import ShadowGovernor, ShadowSettings
from sidecar.config.tensors import JSON_HEAD_KEY
from sidecar.http import errors
from sidecar.http.client import BrokenAnswer, ClientResponse
from sidecar.telemetry.logwriter import LogWriter
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.upstreams import InFlightCount, UpstreamCall, UpstreamClient

log = structlog.get_logger("sidecar.upstream.shadow")

SHADOW_HEADER = "X-Sidecar-Shadow"

# Answers (both together) up to this size are compared on the loop (well under a
# millisecond); larger ones in a thread.
_COMPARE_INLINE = 64 * 1024


@dataclass(slots=True)
class PrimaryOutcome:
    status: int
    body: bytes | None  # None: too large to compare, or never held (fallback, error)
    latency: float | None  # the model's time (to headers), seconds; None: it gave no answer
    streamed: bool = False
    reason: str | None = None  # why there is nothing to compare
    encoding: bytes | None = None  # its Content-Encoding, as sent
    json_head: str | None = None  # its Inference-Header-Content-Length (binary V2 tensors)


@dataclass(slots=True)
class _ShadowAnswer:
    outcome: str  # "ok", or why there is no body to compare
    status: int  # 0: no answer
    body: bytes | None  # None: too large to compare, or no answer
    latency: float
    encoding: bytes | None = None  # its Content-Encoding, as sent
    json_head: str | None = None  # its Inference-Header-Content-Length


@dataclass(slots=True)
class ShadowTicket:
    """The primary side's half of one mirrored request."""

    outcome: asyncio.Future[PrimaryOutcome | None]

    def resolve(self, outcome: PrimaryOutcome | None) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)


@dataclass
class StreamCapture:
    """Bytes of a streamed primary answer, kept for comparison up to a cap."""

    limit: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    overflow: bool = False

    def add(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.overflow = True
            self.chunks.clear()
        else:
            self.chunks.append(chunk)


async def _read_capped(response: ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.read_chunk():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


_INFLATABLE = frozenset({b"gzip", b"x-gzip", b"deflate"})


def decoded(body: bytes, encoding: bytes | None, limit: int) -> bytes | None:
    """The body as the model meant it: gzip and deflate (zlib) undone, up to ``limit``
    bytes (None past it, or when it does not inflate); other encodings as they are."""
    if encoding is None or encoding.strip().lower() not in _INFLATABLE:
        return body
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a gzip or a zlib header
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or not inflater.eof:
        return None
    return out


class Governor:
    """Backs the effective fraction off on trouble and lets it recover when healthy."""

    @classmethod
    def with_fraction_of(cls, previous: Governor) -> Governor:
        """A fresh governor (no references, no samples) that starts at ``previous``'s
        fraction: for a primary model that changed under the same candidate, whose
        backing off still holds while the primary's references are measured anew."""
        governor = cls(previous.configured, previous.settings)
        governor.fraction = previous.fraction
        return governor

    def __init__(self, configured: float, settings: ShadowGovernor) -> None:
        self.configured = configured
        self.fraction = configured
        self.settings = settings
        self._reset()
        self.reference_latency: float | None = None
        self.reference_error_rate: float | None = None

    def _reset(self) -> None:
        self.shadow_sent = 0
        self.shadow_failed = 0
        # count, latency sum, failures, latencies summed (answers of the primary's own)
        self.mirrored = [0, 0.0, 0, 0]
        self.plain = [0, 0.0, 0, 0]

    def record_shadow(self, failed: bool) -> None:
        self.shadow_sent += 1
        self.shadow_failed += failed

    def record_primary(self, latency: float | None, error: bool, mirrored: bool) -> None:
        """One request the primary model was asked: ``latency`` is its time to answer,
        None when it gave no answer (a failure another step answered for, or none
        did): such a request counts in the failure rate, not in the mean latency."""
        bucket = self.mirrored if mirrored else self.plain
        bucket[0] += 1
        bucket[2] += error
        if latency is not None:
            bucket[1] += latency
            bucket[3] += 1

    def evaluate(self) -> tuple[float, str]:
        """Once per interval: the new fraction and why."""
        s = self.settings
        plain, mirrored = self.plain, self.mirrored
        # Unmirrored traffic is the reference.
        if plain[0] >= s.min_samples:
            self.reference_error_rate = plain[2] / plain[0]
        if plain[3] >= s.min_samples:
            self.reference_latency = plain[1] / plain[3]
        reason = "healthy"
        if self.shadow_sent >= s.min_samples and (
            self.shadow_failed / self.shadow_sent > s.max_shadow_failure_rate
        ):
            reason = "shadow failing"
        elif (
            mirrored[3] >= s.min_samples
            and self.reference_latency is not None
            and mirrored[1] / mirrored[3] > (1 + s.max_latency_increase) * self.reference_latency
            # no flapping on sub-ms noise
            and mirrored[1] / mirrored[3] - self.reference_latency > s.min_latency_increase
        ):
            reason = "primary slower while shadowing"
        elif (
            mirrored[0] >= s.min_samples
            and self.reference_error_rate is not None
            and mirrored[2] / mirrored[0] > self.reference_error_rate + s.max_error_rate_increase
        ):
            reason = "primary failing more while shadowing"
        if reason == "healthy":
            self.fraction = min(self.configured, self.fraction + s.recover_step * self.configured)
        else:
            self.fraction *= s.backoff_factor
            if self.fraction < 0.001:
                self.fraction = 0.0
        self._reset()
        return self.fraction, reason


class ShadowMirror:
    def __init__(
        self,
        route: str,
        settings: ShadowSettings,
        upstream: UpstreamClient,
        metrics: Metrics,
        comparison_log: LogWriter | None,
        copies_out: InFlightCount | None = None,
        governor: Governor | None = None,
    ) -> None:
        """``governor``: the one of the mirror a reload replaces, carried on (the
        caller checked that it judges the same candidate by the same settings): its
        fraction and references go on, and it is governed from this mirror once in
        service (``start_governing``), not from ``start``."""
        self.route = route
        self.settings = settings
        self.upstream = upstream
        self.in_flight = 0  # this mirror's own copies (what stop() waits for)
        # Copies out for the route across reloads: the retired mirror's count too.
        self.copies_out = copies_out if copies_out is not None else InFlightCount()
        self._idle = asyncio.Event()
        self._idle.set()
        self.governor_carried = governor is not None
        self.governor = (
            governor if governor is not None else Governor(settings.fraction, settings.governor)
        )
        self._comparer = Comparer(settings.compare)
        self._log = comparison_log
        self._tasks = BackgroundTasks()  # the copies in flight
        self._governing = BackgroundTasks()
        self._requests = metrics.shadow_requests
        self._comparisons = metrics.shadow_comparisons
        self._delta = metrics.shadow_latency_delta.labels(route)
        self._fraction_gauge = metrics.shadow_fraction.labels(route)
        self._fraction_gauge.set(self.governor.fraction)

    # -- the hot path -------------------------------------------------------------

    def mirror(self, call: UpstreamCall) -> ShadowTicket | None:
        if not sampled(self.governor.fraction):
            return None
        copies_out = self.copies_out
        size = len(call.body) if call.body is not None else 0
        # The bytes too: a copy holds its body until the candidate answers or times
        # out, the request long gone and out of server.max_buffered_bodies. A slow
        # candidate held max_in_flight of the largest bodies (32 x 8 MiB went to
        # 419 MB with the bodies' budget at 16 MiB).
        if size > self.settings.max_bytes:  # never fits, however few copies are out
            self._requests.labels(self.route, "skipped_too_large").inc()
            return None
        if (
            copies_out.count >= self.settings.max_in_flight
            or copies_out.bytes + size > self.settings.max_bytes
        ):
            self._requests.labels(self.route, "skipped_busy").inc()
            return None
        headers = call.headers.copy()
        headers[SHADOW_HEADER] = "1"
        copy = UpstreamCall(call.method, call.target, headers, call.body, call.request_id)
        ticket = ShadowTicket(asyncio.get_running_loop().create_future())
        self.in_flight += 1
        copies_out.count += 1
        copies_out.bytes += size
        self._idle.clear()
        self._tasks.spawn(self._shadow(copy, ticket, size), name=f"shadow-{self.route}")
        return ticket

    # -- the background -----------------------------------------------------------

    def start(self) -> None:
        if not self.governor_carried:
            self.start_governing()

    def start_governing(self) -> None:
        """Evaluate the governor each interval. A carried governor starts at the swap:
        until then the retired mirror governs it (two at once would each evaluate a
        share of the interval's samples)."""
        if self.settings.governor.enabled:
            self._governing.spawn(self._govern(), name=f"shadow-governor-{self.route}")

    async def wait_idle(self) -> None:
        """Until every copy in flight has been compared (or given up)."""
        await self._idle.wait()

    async def stop_governing(self) -> None:
        await self._governing.stop()

    async def stop(self, drain_within: float = 2.0) -> None:
        """Let copies in flight finish briefly, then cancel what is left."""
        try:
            async with asyncio.timeout(drain_within):
                await self.wait_idle()
        except TimeoutError:
            log.info("shadow_copies_cancelled", route=self.route, in_flight=self.in_flight)
        await self._tasks.stop()
        await self._governing.stop()

    async def _govern(self) -> None:
        while True:
            await asyncio.sleep(self.settings.governor.interval)
            self.govern()

    def govern(self) -> float:
        before = self.governor.fraction
        fraction, reason = self.governor.evaluate()
        self._fraction_gauge.set(fraction)
        if fraction != before:
            log.info(
                "shadow_fraction_changed",
                route=self.route,
                fraction=round(fraction, 4),
                previous=round(before, 4),
                reason=reason,
            )
        return fraction

    async def _shadow(self, call: UpstreamCall, ticket: ShadowTicket, size: int) -> None:
        try:
            await self._compare_when_both_in(call, ticket)
        finally:
            self.in_flight -= 1
            self.copies_out.count -= 1
            self.copies_out.bytes -= size
            if self.in_flight == 0:
                self._idle.set()

    async def _send(self, call: UpstreamCall) -> _ShadowAnswer:
        limit = self.settings.compare.max_body_size
        started = time.perf_counter()
        self._requests.labels(self.route, "sent").inc()
        try:
            async with asyncio.timeout(self.settings.timeout):
                # The shadow's own headers and deadline, never the primary's.
                response = await self.upstream.send(call, within=self.settings.timeout)
                try:
                    body = await _read_capped(response, limit)
                finally:
                    response.release()  # reused only when read to the end
                return _ShadowAnswer(
                    "ok" if body is not None else "skipped_too_large",
                    response.status,
                    body,
                    time.perf_counter() - started,
                    response.headers.get_raw(b"content-encoding"),
                    response.headers.text(JSON_HEAD_KEY),
                )
        except (TimeoutError, errors.UpstreamTimeout):
            return _ShadowAnswer("timeout", 0, None, time.perf_counter() - started)
        except (errors.SidecarError, BrokenAnswer):
            return _ShadowAnswer("error", 0, None, time.perf_counter() - started)

    def _compare(self, primary: PrimaryOutcome, shadow: _ShadowAnswer, limit: int) -> Comparison:
        """Compare what the two answers hold: encoded ones (clients' Accept-Encoding
        reaches both models) are decoded first."""
        assert primary.body is not None
        assert shadow.body is not None
        primary_body = decoded(primary.body, primary.encoding, limit)
        shadow_body = decoded(shadow.body, shadow.encoding, limit)
        if primary_body is None or shadow_body is None:
            return Comparison("error", "an answer's content encoding could not be undone")
        return self._comparer.compare(
            primary.status,
            primary_body,
            shadow.status,
            shadow_body,
            streamed=primary.streamed,
            primary_head=primary.json_head,
            shadow_head=shadow.json_head,
        )

    async def _compare_when_both_in(self, call: UpstreamCall, ticket: ShadowTicket) -> None:
        shadow = await self._send(call)
        outcome, status, body, latency = shadow.outcome, shadow.status, shadow.body, shadow.latency
        self.governor.record_shadow(failed=outcome in ("error", "timeout") or status >= 500)
        primary = await ticket.outcome
        record: dict[str, object] = {
            "timestamp": time.time(),
            "request_id": call.request_id,
            "route": self.route,
            "primary_status": (primary.status or None) if primary else None,  # 0: none
            "shadow_status": status or None,
            "primary_ms": (
                round(primary.latency * 1000, 3)
                if primary is not None and primary.latency is not None
                else None
            ),
            "shadow_ms": round(latency * 1000, 3),
        }
        if primary is not None and primary.body is None and primary.reason == "too_large":
            outcome = "skipped_too_large"
        if outcome != "ok":
            self._requests.labels(self.route, outcome).inc()
        if outcome == "skipped_too_large":
            self._comparisons.labels(self.route, "skipped").inc()
            record.update(result="skipped", reason="too large to compare")
        elif primary is None or primary.body is None:
            # Nothing of the primary's to compare with (the fallback answered for it,
            # it failed, its stream was cut): not the candidate's doing, so not an
            # error of the comparison. The candidate's own failure, if any, is
            # counted in sidecar_shadow_requests_total and by the governor.
            self._comparisons.labels(self.route, "skipped").inc()
            reason = (primary.reason if primary else None) or "no primary answer"
            record.update(result="skipped", agreement=None, reason=reason)
        elif body is None:
            self._comparisons.labels(self.route, "error").inc()
            record.update(result="error", agreement=None, reason=f"shadow {outcome}")
        else:
            compare = functools.partial(
                self._compare, primary, shadow, self.settings.compare.max_body_size
            )
            if (
                len(primary.body) + len(body) > _COMPARE_INLINE
                or primary.encoding is not None
                or shadow.encoding is not None
            ):
                # Reading every prediction number is Python work (about 20 ms per MiB):
                # on the loop it would hold up every primary request meanwhile; in a
                # thread the loop gets the interpreter back every switch interval. An
                # encoded answer may inflate to max_body_size, whatever its own size.
                comparison = await asyncio.to_thread(compare)
            else:
                comparison = compare()
            self._comparisons.labels(self.route, comparison.result).inc()
            # A body to compare is the model's answer, which has its latency.
            delta = None if primary.latency is None else latency - primary.latency
            if delta is not None:
                self._delta.observe(delta)
            record.update(
                result=comparison.result,
                agreement=comparison.agreement,
                reason=comparison.reason,
                latency_delta_ms=None if delta is None else round(delta * 1000, 3),
                max_abs_diff=comparison.max_abs_diff,
                cosine=comparison.cosine,
                label_agreement=comparison.label_agreement,
                differences=comparison.differences,
            )
        if self._log is not None:
            self._log.submit(record)
