"""Prediction and feature drift: population stability index (PSI) against a baseline.

On the request path a route's monitor only appends the request and response bodies
to a queue bounded in bytes (O(1), no parsing; past the budget a pair is dropped and
counted). Each second a background task takes what arrived and parses it, newest
first, a tenth of a millisecond at a time with the event loop's other work in
between, keeping only the numbers of each signal (the prediction and each
configured feature) in a window of recent values; every ``interval`` it computes

    PSI = sum over bins of (actual - expected) * ln(actual / expected)

against the baseline's bin proportions. It exports ``sidecar_prediction_psi{route}``
and ``sidecar_feature_psi{route,feature}`` and logs ``drift_detected`` when a PSI
reaches ``threshold`` and ``drift_cleared`` only once it falls below
``clear_below`` (hysteresis: no flapping around one line).

The baseline is a JSON file of bins per signal, made by ``sidecar baseline`` from a
payload log, or frozen from the first ``freeze_after`` responses and written out.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import structlog

from sidecar.analytics.predictions import PredictionReader, json_object
from sidecar.background import BackgroundTasks
from sidecar.config.baselines import Baseline, Histogram, psi
from sidecar.config.rules import MISSING, FieldPath, lookup, parse_field_path
from sidecar.config.schema import DriftSettings
from sidecar.config.tensors import read_v2
from sidecar.telemetry.metrics import Metrics

log: Final = structlog.get_logger("sidecar.analytics.drift")

PREDICTION: Final = "prediction"


# Bodies waiting for the parser are taken in at least this often (seconds).
DIGEST_EVERY: Final = 1.0
# Seconds of parsing between two passes of the event loop. Parsing in a thread did
# not spare requests: on one core the thread takes the core and the interpreter
# lock from the loop for as long as the scheduler lets it (bench features at c=1:
# p99 0.66 ms with drift on against 0.41 without).
DIGEST_SLICE: Final = 0.0001
# Values of one signal kept to freeze a baseline from, each of the first
# ``freeze_after`` answers giving an equal share: an answer's number of predictions
# is the client's choice (its batch), and keeping them all took hundreds of MB, then
# a sort of them all on the event loop.
FREEZE_VALUES: Final = 100_000


# A request body, its answer's, and each one's JSON head length when it carries binary
# V2 tensors.
_Pair = tuple[bytes, bytes, int | None, int | None]


class SignalExtractor:
    """Turns one (request, response) pair into values per signal."""

    def __init__(self, settings: DriftSettings) -> None:
        self.reader = PredictionReader.build(settings.protocol, settings.output, settings.json_path)
        self.features: tuple[tuple[str, FieldPath], ...] = tuple(
            (f.name, parse_field_path(f.field)) for f in settings.features
        )

    @property
    def signals(self) -> list[str]:
        return [PREDICTION, *(name for name, _ in self.features)]

    def extract(
        self,
        request: Any,
        response: Any,
        problems: list[tuple[str, str]] | None = None,
        limit: int | None = None,
    ) -> dict[str, list[float]]:
        """Values per signal (at most ``limit`` predictions); a feature that is
        missing, null or not a number gets no value, and (when ``problems`` is given)
        says which."""
        # JSON holds no NaN nor infinity; a binary V2 tensor may. Taken in, they froze
        # into a baseline written with nulls (which did not load) and unordered edges.
        predictions = self.reader.values(response, limit)
        out = {PREDICTION: [v for v in predictions if math.isfinite(v)]}
        for name, path in self.features:
            value = lookup(request, path)
            if (
                (isinstance(value, float) or isinstance(value, int))  # noqa: SIM101
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                out[name] = [float(value)]
                continue
            out[name] = []
            if problems is not None:
                kind = (
                    "missing" if value is MISSING else "null" if value is None else "not_a_number"
                )
                problems.append((name, kind))
        return out


def build_baseline(settings: DriftSettings, pairs: Iterable[tuple[Any, Any]]) -> Baseline:
    """A baseline from (request JSON, response JSON) pairs, e.g. from a payload log."""
    extractor = SignalExtractor(settings)
    samples: dict[str, list[float]] = {s: [] for s in extractor.signals}
    count = 0
    for request, response in pairs:
        count += 1
        for signal, values in extractor.extract(request, response).items():
            samples[signal].extend(values)
    return baseline_from_signals(settings, samples, count)


def baseline_from_signals(
    settings: DriftSettings, samples: dict[str, list[float]], count: int
) -> Baseline:
    histograms = {s: Histogram.from_samples(v, settings.bins) for s, v in samples.items() if v}
    if PREDICTION not in histograms:
        raise ValueError("no predictions found: check the protocol and output settings")
    return Baseline(histograms, count)


class DriftMonitor:
    def __init__(
        self,
        route: str,
        settings: DriftSettings,
        baseline_path: Path,
        metrics: Metrics,
        *,
        baseline: Baseline | None,
    ) -> None:
        self.route = route
        self.settings = settings
        self.baseline_path = baseline_path
        self._metrics = metrics
        self._extractor = SignalExtractor(settings)
        self._pending: deque[_Pair] = deque()
        self._pending_bytes = 0
        self._max_pending_bytes = settings.max_pending_bytes
        self._max_pair_bytes = settings.max_pair_bytes
        self._window = settings.window
        self._dropped = metrics.dropped.labels("drift_pending", route)
        # Pairs too large to parse without holding the event loop up.
        self._too_large = metrics.dropped.labels("drift_too_large", route)
        self._said_too_large = False
        # Pairs let go unparsed: newer ones had filled every window.
        self._superseded = metrics.dropped.labels("drift_superseded", route)
        # Pairs that could not be read: not JSON (nor a V2 head and its tensors), or an
        # answer no reader foresaw.
        self._unreadable = metrics.dropped.labels("drift_unreadable", route)
        self.last_error: str | None = None  # the latest failure, reading or evaluating
        self._task: asyncio.Task[None] | None = None
        self._windows: dict[str, deque[float]] = {
            s: deque(maxlen=settings.window) for s in self._extractor.signals
        }
        self._freezing: dict[str, list[float]] = {s: [] for s in self._extractor.signals}
        self._frozen_from = 0  # responses taken in for a baseline to be frozen
        self._freeze_share = max(1, FREEZE_VALUES // (settings.freeze_after or 1))
        # None: frozen from the first freeze_after responses, then written to the path.
        self.baseline = baseline
        self.drifting: dict[str, bool] = dict.fromkeys(self._extractor.signals, False)
        self.last_psi: dict[str, float] = {}
        self._tasks = BackgroundTasks()

    # -- the hot path -------------------------------------------------------------

    def observe(
        self,
        request_body: bytes,
        response_body: bytes,
        request_head: int | None = None,
        response_head: int | None = None,
    ) -> None:
        """``request_head``, ``response_head``: a binary V2 body's JSON head length
        (``Inference-Header-Content-Length``); its tensors are read as data."""
        if not self._extractor.features:
            request_body = b""  # only features read the request: neither kept nor parsed
        size = len(request_body) + len(response_body)
        if size > self._max_pair_bytes:
            self._too_large.inc()
            if not self._said_too_large:  # a route of large pairs would get no PSI
                self._said_too_large = True
                log.warning(
                    "drift_pair_too_large",
                    route=self.route,
                    bytes=size,
                    max_pair_bytes=self._max_pair_bytes,
                    message="pairs this large are not parsed for drift (counted in "
                    'sidecar_dropped_total{buffer="drift_too_large"}); raise max_pair_bytes',
                )
            return
        if self._pending_bytes + size > self._max_pending_bytes:
            self._dropped.inc()
            return
        self._pending.append((request_body, response_body, request_head, response_head))
        self._pending_bytes += size

    # -- the background -----------------------------------------------------------

    def start(self) -> None:
        self._task = self._tasks.spawn(self._run(), name=f"drift-{self.route}")

    @property
    def stopped(self) -> str | None:
        """Why the started monitor's task ended, if it did (None while it runs)."""
        task = self._task
        if task is None or not task.done():
            return None
        if task.cancelled():
            return "cancelled"
        error = task.exception()
        return "ended" if error is None else f"{type(error).__name__}: {error}"[:200]

    async def stop(self) -> None:
        await self._tasks.stop()

    async def _run(self) -> None:
        interval = self.settings.interval
        # Bodies are taken in at least every second, so the pairs waiting stay few
        # and the byte budget is rarely reached.
        step = min(interval, DIGEST_EVERY)
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        while True:
            await asyncio.sleep(step)
            try:
                await self._digest_in_slices(self._take_pending())
                if loop.time() >= due:
                    due += interval
                    self._compute()
            except Exception as exc:  # one pass lost, never the monitor
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                log.exception("drift_evaluation_failed", route=self.route)

    def _take_pending(self) -> deque[_Pair]:
        pending, self._pending, self._pending_bytes = self._pending, deque(), 0
        return pending

    async def _digest_in_slices(self, pending: deque[_Pair]) -> None:
        """``_digest``, with a pass of the event loop after each ``DIGEST_SLICE``
        seconds of parsing. One pair is parsed in one step, so pairs larger than
        ``max_pair_bytes`` are never taken (1 MiB by default, about 3 ms of parsing;
        10 MB held requests up for tens of milliseconds, as it held the interpreter
        lock when parsed in a thread)."""
        clock = time.perf_counter
        until = clock() + DIGEST_SLICE
        for _ in self._digesting(pending):
            if clock() >= until:
                await asyncio.sleep(0)
                until = clock() + DIGEST_SLICE

    def _digest(self, pending: deque[_Pair]) -> None:
        for _ in self._digesting(pending):
            pass

    def _digesting(self, pending: deque[_Pair]) -> Iterator[None]:
        """Parse bodies into the numbers each signal needs; the bodies are let go.
        Yields after each pair. A baseline being frozen reads oldest first, so each
        answer's values go into the windows as it is read; otherwise the windows take
        them once all are parsed (newest first, few: see below).

        Newest first: once every signal's window would be full, older pairs could only
        be pushed out of the windows, so they are let go unparsed (and counted). Under
        load that is most pairs, and most of drift's cost. A baseline being frozen
        takes every pair, oldest first."""
        freezing = self.baseline is None
        histograms = self.baseline.histograms if self.baseline is not None else {}
        problems: list[tuple[str, str]] = []
        taken: list[dict[str, list[float]]] = []
        wanted = dict.fromkeys(self._windows, self._window)  # values each window lacks
        lacking = len(wanted)
        failures = 0
        first_failure: Exception | None = None
        freeze_after = self.settings.freeze_after or 0
        for parsed, (request_body, response_body, request_head, response_head) in enumerate(
            iter(pending) if freezing else reversed(pending)
        ):
            if not lacking and not freezing:
                self._superseded.inc(len(pending) - parsed)
                break
            yield
            # What one answer can give: its values past this are never kept, so not read.
            into_baseline = freezing and self._frozen_from < freeze_after
            limit = max(self._window, self._freeze_share) if into_baseline else self._window
            try:
                response = read_v2(response_body, response_head)
                request = read_v2(request_body, request_head) if self._extractor.features else None
                signals = self._extractor.extract(request, response, problems, limit)
            except Exception as exc:  # noqa: BLE001 - one answer lost, never the monitor
                failures += 1
                first_failure = first_failure or exc
                continue
            if freezing:
                # Oldest first: straight into the windows (bounded), not held until the
                # whole digest is parsed (16 MiB of answers held as floats at once).
                for signal, values in signals.items():
                    self._windows[signal].extend(values)
            else:
                taken.append(signals)
            for signal, values in signals.items():
                if values and wanted[signal] > 0:
                    wanted[signal] -= len(values)
                    if wanted[signal] <= 0:
                        lacking -= 1
            for name, _ in self._extractor.features:
                histogram = histograms.get(name)
                values = signals[name]
                if histogram is not None and values and not histogram.contains(values[0]):
                    problems.append((name, "out_of_range"))
            if into_baseline:
                self._frozen_from += 1
                share = self._freeze_share
                for signal, values in signals.items():
                    self._freezing[signal].extend(values[:share])
        if not freezing:
            taken.reverse()  # the windows take values oldest first
        for signals in taken:
            for signal, values in signals.items():
                self._windows[signal].extend(values)
        for name, kind in problems:
            self._metrics.feature_quality.labels(self.route, name, kind).inc()
        if failures:
            self._unreadable.inc(failures)
            self.last_error = f"{type(first_failure).__name__}: {first_failure}"[:200]
            log.error(
                "drift_answers_unreadable",
                route=self.route,
                answers=failures,
                error=self.last_error,
                message="not taken in for drift (counted in "
                'sidecar_dropped_total{buffer="drift_unreadable"})',
            )

    def evaluate(self) -> dict[str, float]:
        """Take in what arrived, then compute PSI per signal (when there is enough)."""
        self._digest(self._take_pending())
        return self._compute()

    def _compute(self) -> dict[str, float]:
        if self.baseline is None:
            self._maybe_freeze()
            return {}
        results: dict[str, float] = {}
        for signal, window in self._windows.items():
            histogram = self.baseline.histograms.get(signal)
            if histogram is None or len(window) < self.settings.min_samples:
                continue
            value = psi(histogram.proportions, histogram.proportions_of(window))
            results[signal] = value
            self._report(signal, value)
        self.last_psi = results
        return results

    def _maybe_freeze(self) -> None:
        assert self.settings.freeze_after is not None
        if self._frozen_from < self.settings.freeze_after:
            return
        try:
            baseline = baseline_from_signals(self.settings, self._freezing, self._frozen_from)
        except ValueError as exc:
            # None of those answers held a prediction: start again with the next ones
            # (the settings may be wrong, or the model was answering something else).
            self._frozen_from = 0
            self._freezing = {s: [] for s in self._extractor.signals}
            self.last_error = f"cannot freeze a baseline: {exc}"
            log.error("drift_baseline_not_frozen", route=self.route, error=str(exc))
            return
        self.baseline = baseline
        self._freezing = {}
        try:
            self.baseline_path.parent.mkdir(parents=True, exist_ok=True)
            self.baseline_path.write_bytes(self.baseline.to_json(self.route))
        except OSError as exc:
            # The alarms run on it from memory; a restart would freeze a new one.
            self.last_error = f"baseline frozen but not written: {exc}"[:200]
            log.error(
                "drift_baseline_not_written",
                route=self.route,
                path=str(self.baseline_path),
                error=str(exc),
            )
            return
        log.info(
            "drift_baseline_frozen",
            route=self.route,
            path=str(self.baseline_path),
            samples=self.baseline.samples,
        )

    def _report(self, signal: str, value: float) -> None:
        if signal == PREDICTION:
            self._metrics.prediction_psi.labels(self.route).set(value)
        else:
            self._metrics.feature_psi.labels(self.route, signal).set(value)
        if not self.drifting[signal] and value >= self.settings.threshold:
            self.drifting[signal] = True
            log.warning(
                "drift_detected",
                route=self.route,
                signal=signal,
                psi=round(value, 4),
                threshold=self.settings.threshold,
            )
        elif self.drifting[signal] and value < self.settings.clear_below:
            self.drifting[signal] = False
            log.info(
                "drift_cleared",
                route=self.route,
                signal=signal,
                psi=round(value, 4),
                clear_below=self.settings.clear_below,
            )


def payload_pairs(
    lines: Iterable[bytes], route: str, source: str = ""
) -> Iterable[tuple[Any, Any]]:
    """(request, response) JSON pairs of one route from payload-log lines; ValueError
    names a line (of ``source``) that is not such a record."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = json_object(line, number, source)
        if record.get("route") != route or record.get("status") != 200:
            continue
        if "request" not in record or "response" not in record:
            where = f"{source} line {number}" if source else f"line {number}"
            raise ValueError(f"{where}: no request or response")
        yield record["request"], record["response"]
