"""sidecar.analytics.drift: histograms, PSI and the drift monitor, called directly."""

from __future__ import annotations

import asyncio
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from sidecar.analytics import drift, predictions
from sidecar.analytics.drift import (
    Baseline,
    DriftMonitor,
    Histogram,
    SignalExtractor,
    build_baseline,
    payload_pairs,
    psi,
)
from sidecar.config.schema import DriftSettings
from sidecar.telemetry.metrics import Metrics


def settings(**values: Any) -> DriftSettings:
    base: dict[str, Any] = {"protocol": "v1", "baseline": "baseline.json", "min_samples": 10}
    base.update(values)
    return DriftSettings.model_validate(base)


def pair(prediction: float, **features: Any) -> tuple[bytes, bytes]:
    return orjson.dumps(features), orjson.dumps({"predictions": [prediction]})


# histograms


def test_a_histogram_needs_samples() -> None:
    with pytest.raises(ValueError, match="no samples"):
        Histogram.from_samples([], 10)


def test_few_distinct_values_get_a_bin_each_and_one_for_unseen_values() -> None:
    h = Histogram.from_samples([1.0, 1.0, 2.0, 3.0], 3)
    assert h == Histogram("categorical", (1.0, 2.0, 3.0), (0.5, 0.25, 0.25, 0.0), 1.0, 3.0)
    assert h.proportions_of([3.0, 7.0, 7.0, 1.0]) == (0.25, 0.0, 0.25, 0.5)
    assert h.contains(2.0)
    assert not h.contains(2.5)


def test_many_distinct_values_get_quantile_bins() -> None:
    h = Histogram.from_samples([float(v) for v in range(100)], 4)
    assert h == Histogram("numeric", (25.0, 50.0, 75.0), (0.25, 0.25, 0.25, 0.25), 0.0, 99.0)
    assert h.proportions_of([24.0, 25.0, 74.9, 75.0, 1000.0]) == (0.2, 0.2, 0.2, 0.4)
    assert h.contains(0.0)
    assert h.contains(99.0)
    assert not h.contains(-0.5)
    assert not h.contains(99.5)


def test_one_more_distinct_value_than_bins_is_numeric() -> None:
    assert Histogram.from_samples([1.0, 2.0, 3.0], 3).kind == "categorical"
    h = Histogram.from_samples([1.0, 2.0, 3.0, 4.0], 3)
    assert h.kind == "numeric"
    assert h.points == (2.0, 3.0)


def test_a_numeric_histogram_without_a_range_contains_everything() -> None:
    assert Histogram("numeric", (1.0,), (0.5, 0.5)).contains(1e9)
    assert Histogram("numeric", (1.0,), (0.5, 0.5), low=0.0).contains(1e9)


def test_no_samples_have_no_proportions() -> None:
    h = Histogram("numeric", (1.0,), (0.5, 0.5))
    assert h.proportions_of([]) == (0.0, 0.0)


def test_a_histogram_survives_json_with_or_without_its_range() -> None:
    h = Histogram("numeric", (1.0, 2.0), (0.25, 0.5, 0.25), 0.5, 3.0)
    assert h.to_json() == {
        "kind": "numeric",
        "points": [1.0, 2.0],
        "proportions": [0.25, 0.5, 0.25],
        "range": [0.5, 3.0],
    }
    assert Histogram.from_json(orjson.loads(orjson.dumps(h.to_json()))) == h
    bare = Histogram("categorical", (1.0,), (1.0, 0.0))
    assert "range" not in bare.to_json()
    assert Histogram.from_json(bare.to_json()) == bare
    assert "range" not in Histogram("numeric", (1.0,), (1.0, 0.0), low=0.0).to_json()


def test_a_histogram_from_json_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown histogram kind 'other'"):
        Histogram.from_json({"kind": "other", "points": [], "proportions": [1.0]})
    with pytest.raises(ValueError, match="one proportion more than its points"):
        Histogram.from_json({"kind": "numeric", "points": [1], "proportions": [1.0]})
    with pytest.raises(ValueError, match="one proportion more than its points"):
        Histogram.from_json({"kind": "numeric", "points": [1], "proportions": [0.5, 0.25, 0.25]})


# PSI


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift() -> None:
    assert psi((0.25, 0.75), (0.25, 0.75)) == 0.0
    assert psi((0.5, 0.5), (0.9, 0.1)) == pytest.approx(0.8788898309344878)
    assert psi((0.5, 0.5), (0.6, 0.4)) < psi((0.5, 0.5), (0.9, 0.1))


def test_empty_bins_are_floored_so_psi_stays_finite() -> None:
    assert psi((1.0, 0.0), (0.5, 0.5)) == pytest.approx(4.60431846666895)
    assert psi((0.25, 0.25, 0.25, 0.25), (0.5, 0.5, 0.0, 0.0)) == pytest.approx(4.257031786505947)
    assert psi((0.0, 1.0), (0.0, 1.0)) == 0.0


# baselines


def test_a_baseline_is_written_and_read_back(tmp_path: Path) -> None:
    baseline = Baseline({"prediction": Histogram("categorical", (0.0, 1.0), (0.5, 0.5, 0.0))}, 42)
    path = tmp_path / "b.json"
    path.write_bytes(baseline.to_json("infer"))
    document = orjson.loads(path.read_bytes())
    assert (document["version"], document["route"], document["samples"]) == (1, "infer", 42)
    assert document["created"].endswith("+00:00")
    assert Baseline.load(path) == baseline


def test_signals_are_the_prediction_and_each_feature() -> None:
    extractor = SignalExtractor(
        settings(features=[{"name": "age", "field": "inputs.age"}, {"name": "n", "field": "n"}])
    )
    assert extractor.signals == ["prediction", "age", "n"]
    problems: list[tuple[str, str]] = []
    values = extractor.extract(
        {"inputs": {"age": 30}, "n": True}, {"predictions": [0.5, 1]}, problems
    )
    assert values == {"prediction": [0.5, 1.0], "age": [30.0], "n": []}
    assert problems == [("n", "not_a_number")]
    problems.clear()
    assert extractor.extract({"inputs": {"age": None}, "n": 2.5}, {}, problems) == {
        "prediction": [],
        "age": [],
        "n": [2.5],
    }
    extractor.extract({"n": "x"}, {}, problems)
    assert problems == [("age", "null"), ("age", "missing"), ("n", "not_a_number")]
    assert extractor.extract({}, {}) == {"prediction": [], "age": [], "n": []}


def test_a_baseline_is_built_from_request_and_answer_pairs() -> None:
    s = settings(
        bins=3, features=[{"name": "age", "field": "age"}, {"name": "gone", "field": "gone"}]
    )
    pairs = [({"age": 20 + i % 2}, {"predictions": [i % 3]}) for i in range(6)]
    baseline = build_baseline(s, pairs)
    assert baseline.samples == 6
    assert set(baseline.histograms) == {"prediction", "age"}  # no values: no histogram
    assert baseline.histograms["prediction"].points == (0.0, 1.0, 2.0)
    assert baseline.histograms["age"].proportions == (0.5, 0.5, 0.0)


def test_a_baseline_without_predictions_is_refused() -> None:
    with pytest.raises(ValueError, match="no predictions found"):
        build_baseline(settings(), [({}, {"other": 1})])


def test_payload_pairs_are_the_routes_good_answers() -> None:
    def line(route: str, status: int, n: int) -> bytes:
        return orjson.dumps(
            {"route": route, "status": status, "request": {"n": n}, "response": {"p": n}}
        )

    lines = [
        line("infer", 200, 1),
        b"  \n",
        line("other", 200, 2),
        line("infer", 500, 3),
        line("infer", 0, 5),
        line("alpha", 200, 6),
        line("infer", 200, 4),
    ]
    assert list(payload_pairs(lines, "infer")) == [({"n": 1}, {"p": 1}), ({"n": 4}, {"p": 4})]


# the monitor


class Monitor:
    def __init__(self, tmp_path: Path, baseline: Baseline | None, **values: Any) -> None:
        self.metrics = Metrics()
        self.path = tmp_path / "state" / "baselines" / "infer.json"
        self.monitor = DriftMonitor(
            "infer", settings(**values), self.path, self.metrics, baseline=baseline
        )

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"route": "infer", **labels})

    def quality(self, feature: str, problem: str) -> float:
        return self.sample("sidecar_feature_quality_total", feature=feature, problem=problem) or 0.0


BASELINE = Baseline(
    {
        "prediction": Histogram("categorical", (0.0, 1.0), (0.5, 0.5, 0.0), 0.0, 1.0),
        "age": Histogram("numeric", (30.0,), (0.5, 0.5), 18.0, 90.0),
    },
    100,
)


def test_pairs_wait_within_a_byte_budget_and_the_rest_are_counted(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, max_pending_bytes="40B", features=AGE)
    m.monitor.observe(b"x" * 10, b"y" * 10)
    m.monitor.observe(b"x" * 10, b"y" * 10)  # exactly the budget
    assert (
        m.metrics.registry.get_sample_value(
            "sidecar_dropped_total", {"buffer": "drift_pending", "route": "infer"}
        )
        == 0.0
    )
    m.monitor.observe(b"x", b"")
    assert (
        m.metrics.registry.get_sample_value(
            "sidecar_dropped_total", {"buffer": "drift_pending", "route": "infer"}
        )
        == 1.0
    )
    m.monitor.evaluate()  # takes the pending pairs: the budget is free again
    m.monitor.observe(b"x" * 20, b"y" * 20)
    assert (
        m.metrics.registry.get_sample_value(
            "sidecar_dropped_total", {"buffer": "drift_pending", "route": "infer"}
        )
        == 1.0
    )


def test_psi_waits_for_min_samples_then_is_exported(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, min_samples=10, features=[{"name": "age", "field": "age"}])
    for i in range(9):
        m.monitor.observe(*pair(i % 2, age=20 + 20 * (i % 2)))
    assert m.monitor.evaluate() == {}
    m.monitor.observe(*pair(1, age=40))
    result = m.monitor.evaluate()
    assert result == {"prediction": pytest.approx(0.0), "age": pytest.approx(0.0)}
    assert m.monitor.last_psi == result
    assert m.sample("sidecar_prediction_psi") == pytest.approx(0.0)
    assert m.sample("sidecar_feature_psi", feature="age") == pytest.approx(0.0)


def test_a_shift_is_detected_at_the_threshold_and_cleared_only_below_clear_below(
    tmp_path: Path,
) -> None:
    m = Monitor(tmp_path, BASELINE, window=10, threshold=0.5, clear_below=0.1)
    with capture_logs() as logs:
        for _ in range(10):
            m.monitor.observe(*pair(1.0))
        shifted = m.monitor.evaluate()["prediction"]
        assert shifted == pytest.approx(psi((0.5, 0.5, 0.0), (0.0, 1.0, 0.0)))
        assert m.monitor.drifting["prediction"]
        assert m.sample("sidecar_prediction_psi") == pytest.approx(shifted)
        for _ in range(3):
            m.monitor.observe(*pair(0.0))
        middle = m.monitor.evaluate()["prediction"]
        assert 0.1 < middle < 0.5
        assert m.monitor.drifting["prediction"]  # between the lines: still drifting
        m.monitor.observe(*pair(0.0))
        cleared = m.monitor.evaluate()["prediction"]  # four zeros in ten: 0.0405
        assert cleared == pytest.approx(psi((0.5, 0.5, 0.0), (0.4, 0.6, 0.0)))
        assert not m.monitor.drifting["prediction"]
    events = [(e["event"], e.get("signal"), e.get("psi")) for e in logs]
    assert events == [
        ("drift_detected", "prediction", round(shifted, 4)),
        ("drift_cleared", "prediction", round(cleared, 4)),
    ]


def test_a_psi_exactly_at_the_threshold_is_drift(tmp_path: Path) -> None:
    value = psi((0.5, 0.5, 0.0), (0.0, 1.0, 0.0))
    m = Monitor(tmp_path, BASELINE, window=10, threshold=value, clear_below=0.05)
    for _ in range(10):
        m.monitor.observe(*pair(1.0))
    m.monitor.evaluate()
    assert m.monitor.drifting["prediction"]


def test_a_feature_drifts_on_its_own(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, window=10, features=[{"name": "age", "field": "age"}])
    for i in range(10):
        m.monitor.observe(*pair(i % 2, age=80))
    result = m.monitor.evaluate()
    assert result["prediction"] == pytest.approx(0.0)
    assert result["age"] > 0.2
    assert m.monitor.drifting == {"prediction": False, "age": True}
    assert m.sample("sidecar_feature_psi", feature="age") == pytest.approx(result["age"])


def test_feature_problems_are_counted_by_kind(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, features=[{"name": "age", "field": "age"}])
    m.monitor.observe(b"not json", b"{}")  # skipped, and the rest still read
    m.monitor.observe(*pair(1.0))
    m.monitor.observe(*pair(1.0, age=None))
    m.monitor.observe(*pair(1.0, age="old"))
    m.monitor.observe(*pair(1.0, age=95))
    m.monitor.observe(*pair(1.0, age=17.9))
    m.monitor.observe(*pair(1.0, age=90))
    m.monitor.evaluate()
    assert [m.quality("age", k) for k in ("missing", "null", "not_a_number", "out_of_range")] == [
        1.0,
        1.0,
        1.0,
        2.0,
    ]


def test_binary_v2_tensors_are_read_by_their_head_lengths_and_unreadable_pairs_counted(
    tmp_path: Path,
) -> None:
    """tritonclient sends (and asks for) binary tensors by default: such pairs were
    skipped unseen, and drift saw nothing of that traffic."""
    v2 = {"protocol": "v2", "output": "label", "window": 10}
    m = Monitor(tmp_path, BASELINE, **v2, features=[{"name": "age", "field": "inputs[0].data[1]"}])

    def binary(section: str, datatype: str, raw: bytes) -> tuple[bytes, int]:
        head = orjson.dumps(
            {
                section: [
                    {
                        "name": "label" if section == "outputs" else "x",
                        "datatype": datatype,
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ]
            }
        )
        return head + raw, len(head)

    for label in (0, 1):
        request, request_head = binary("inputs", "FP32", struct.pack("<2f", 1.5, 80.0))
        answer, answer_head = binary("outputs", "INT64", struct.pack("<q", label))
        m.monitor.observe(request, answer, request_head, answer_head)
    # Without the head lengths the bodies are not JSON: counted, not silently skipped.
    m.monitor.observe(request, answer)
    m.monitor.evaluate()
    assert list(m.monitor._windows["prediction"]) == [0.0, 1.0]
    assert list(m.monitor._windows["age"]) == [80.0, 80.0]
    assert m.sample("sidecar_dropped_total", buffer="drift_unreadable") == 1


def test_binary_tensors_holding_nan_or_infinity_give_drift_no_value(tmp_path: Path) -> None:
    """JSON cannot hold NaN or infinity; a binary FP32 tensor can. Taken in, they froze
    into a baseline whose file did not load (written as null) and whose quantile
    edges were out of order."""
    m = Monitor(
        tmp_path,
        None,
        protocol="v2",
        freeze_after=10,
        window=10,
        bins=3,
        features=[{"name": "age", "field": "inputs[0].data[0]"}],
    )

    def binary(section: str, value: float) -> tuple[bytes, int]:
        raw = struct.pack("<f", value)
        tensor = {"name": "y", "datatype": "FP32", "parameters": {"binary_data_size": 4}}
        head = orjson.dumps({section: [tensor]})
        return head + raw, len(head)

    for value in (float("nan"), float("inf"), -float("inf"), *(1.0, 2.0) * 3, 1.0):
        request, request_head = binary("inputs", value)
        answer, answer_head = binary("outputs", value)
        m.monitor.observe(request, answer, request_head, answer_head)
    m.monitor.evaluate()
    baseline = m.monitor.baseline
    assert baseline is not None
    assert Baseline.load(m.path) == baseline
    assert baseline.histograms["prediction"].points == (1.0, 2.0)
    assert baseline.histograms["age"].points == (1.0, 2.0)
    assert m.quality("age", "not_a_number") == 3.0


def test_a_feature_without_a_baseline_histogram_is_not_range_checked(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, features=[{"name": "height", "field": "h"}])
    m.monitor.observe(*pair(1.0, h=1e9))
    m.monitor.evaluate()
    assert m.quality("height", "out_of_range") == 0.0


def test_the_window_keeps_only_the_latest_values(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, window=10)
    for _ in range(10):
        m.monitor.observe(*pair(1.0))
    for i in range(10):
        m.monitor.observe(*pair(i % 2))
    assert m.monitor.evaluate()["prediction"] == pytest.approx(0.0)


def test_without_a_baseline_one_is_frozen_from_the_first_answers_and_written(
    tmp_path: Path,
) -> None:
    m = Monitor(tmp_path, None, freeze_after=10, window=10, bins=3)
    for i in range(9):
        m.monitor.observe(*pair(i % 2))
    assert m.monitor.evaluate() == {}
    assert m.monitor.baseline is None
    for _ in range(5):
        m.monitor.observe(*pair(1.0))  # only the first of these is part of the baseline
    with capture_logs() as logs:
        assert m.monitor.evaluate() == {}
    baseline = m.monitor.baseline
    assert baseline is not None
    assert baseline.samples == 10
    assert baseline.histograms["prediction"].proportions == (0.5, 0.5, 0.0)
    assert Baseline.load(m.path) == baseline
    assert [(e["event"], e["samples"]) for e in logs] == [("drift_baseline_frozen", 10)]
    for _ in range(10):
        m.monitor.observe(*pair(0.0))
    assert m.monitor.evaluate()["prediction"] > 0.2


def test_a_frozen_baseline_that_cannot_be_written_is_used_and_said(tmp_path: Path) -> None:
    m = Monitor(tmp_path, None, freeze_after=10, window=10, bins=3)
    (tmp_path / "state").write_text("a file where the baseline's folder would go")
    for i in range(10):
        m.monitor.observe(*pair(i % 2))
    with capture_logs() as logs:
        assert m.monitor.evaluate() == {}  # no exception: the next passes run
    assert m.monitor.baseline is not None
    assert m.monitor.baseline.samples == 10
    assert [e["event"] for e in logs] == ["drift_baseline_not_written"]
    assert (m.monitor.last_error or "").startswith("baseline frozen but not written")


async def test_a_started_monitor_evaluates_every_interval(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, interval="10ms", min_samples=10)
    for i in range(10):
        m.monitor.observe(*pair(i % 2))
    m.monitor.start()
    try:
        for _ in range(500):
            if m.monitor.last_psi:
                break
            await asyncio.sleep(0.01)
        assert m.monitor.last_psi == {"prediction": pytest.approx(0.0)}
    finally:
        await m.monitor.stop()


def test_a_pair_that_would_pass_the_budget_is_dropped(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, max_pending_bytes="40B", features=AGE)
    m.monitor.observe(b"x" * 10, b"y" * 10)
    m.monitor.observe(b"x" * 10, b"y" * 11)
    assert (
        m.metrics.registry.get_sample_value(
            "sidecar_dropped_total", {"buffer": "drift_pending", "route": "infer"}
        )
        == 1.0
    )


def test_without_features_request_bodies_are_neither_kept_nor_parsed(tmp_path: Path) -> None:
    # Only features read the request: its body does not count against the budget,
    # and a request that is not JSON does not cost the answer's prediction.
    m = Monitor(tmp_path, BASELINE, max_pending_bytes="64B", min_samples=2)
    m.monitor.observe(b"not json" * 100, orjson.dumps({"predictions": [1.0]}))
    m.monitor.observe(b"x" * 1000, orjson.dumps({"predictions": [0.0]}))
    assert (
        m.metrics.registry.get_sample_value(
            "sidecar_dropped_total", {"buffer": "drift_pending", "route": "infer"}
        )
        == 0.0
    )
    assert m.monitor.evaluate() == {"prediction": pytest.approx(0.0)}


def test_a_feature_without_a_baseline_does_not_stop_the_others(tmp_path: Path) -> None:
    m = Monitor(
        tmp_path,
        BASELINE,
        window=10,
        features=[{"name": "height", "field": "h"}, {"name": "age", "field": "age"}],
    )
    for i in range(10):
        m.monitor.observe(*pair(i % 2, h=170, age=80))
    assert set(m.monitor.evaluate()) == {"prediction", "age"}


def test_a_drift_exactly_at_clear_below_is_not_cleared(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, window=10, threshold=0.5, clear_below=0.0)
    for _ in range(10):
        m.monitor.observe(*pair(1.0))
    m.monitor.evaluate()
    for i in range(10):
        m.monitor.observe(*pair(i % 2))
    assert m.monitor.evaluate()["prediction"] == 0.0
    assert m.monitor.drifting["prediction"]


class FailingOn:
    """A SignalExtractor that fails on answers holding ``marker``: a stand-in for an
    answer no reader foresaw (no real one is known to fail; the monitor must
    survive the next)."""

    def __init__(
        self,
        extractor: SignalExtractor,
        marker: float,
        error: BaseException | None = None,
    ) -> None:
        self.extractor, self.marker = extractor, marker
        self.error = error or TypeError("an answer no reader foresaw")
        self.features = extractor.features

    def extract(self, request: Any, response: Any, *args: Any) -> dict[str, list[float]]:
        if response == {"predictions": [self.marker]}:
            raise self.error
        return self.extractor.extract(request, response, *args)


async def test_an_answer_that_fails_to_read_is_counted_and_logged_and_the_monitor_runs_on(
    tmp_path: Path,
) -> None:
    """Any exception but a JSON error ended the route's drift task for good."""
    m = Monitor(tmp_path, BASELINE, interval="10ms", min_samples=10, window=10)
    m.monitor._extractor = FailingOn(m.monitor._extractor, 7.0)  # type: ignore[assignment]
    with capture_logs() as logs:
        m.monitor.start()
        try:
            for round_ in range(2):  # the monitor lives on after a failure
                m.monitor.last_psi = {}
                for i in range(10):
                    m.monitor.observe(*pair(i % 2))
                m.monitor.observe(*pair(7.0))  # newest: read first
                for _ in range(500):  # bounded: until this round is evaluated
                    if m.monitor.last_psi:
                        break
                    await asyncio.sleep(0.01)
                assert m.monitor.last_psi == {"prediction": pytest.approx(0.0)}, round_
                assert m.monitor.stopped is None
        finally:
            await m.monitor.stop()
    assert m.sample("sidecar_dropped_total", buffer="drift_unreadable") == 2
    failed = [e for e in logs if e["event"] == "drift_answers_unreadable"]
    assert [(e["answers"], e["error"]) for e in failed] == [
        (1, "TypeError: an answer no reader foresaw")
    ] * 2
    assert m.monitor.last_error == "TypeError: an answer no reader foresaw"


async def test_a_baseline_that_cannot_be_frozen_is_tried_again_not_the_end(
    tmp_path: Path,
) -> None:
    """freeze_after answers without a prediction (a wrong output setting, or a model
    answering something else for a while) raised out of the task: no drift for the
    route from then on, and /health said pass."""
    m = Monitor(tmp_path, None, interval="10ms", freeze_after=10, window=10)
    with capture_logs() as logs:
        m.monitor.start()
        try:
            for _ in range(10):
                m.monitor.observe(b"", orjson.dumps({"other": 1}))
            for _ in range(500):  # bounded: until the freeze was tried
                if m.monitor.last_error:
                    break
                await asyncio.sleep(0.01)
            assert m.monitor.last_error == (
                "cannot freeze a baseline: no predictions found: check the protocol and "
                "output settings"
            )
            assert m.monitor.stopped is None
            for i in range(10):
                m.monitor.observe(*pair(i % 2))
            for _ in range(500):  # bounded: until the next answers froze one
                if m.monitor.baseline is not None:
                    break
                await asyncio.sleep(0.01)
            assert m.monitor.baseline is not None
            assert m.monitor.baseline.samples == 10
        finally:
            await m.monitor.stop()
    assert "drift_baseline_not_frozen" in [e["event"] for e in logs]


def test_a_large_freeze_after_freezes_exactly_that_many_answers(tmp_path: Path) -> None:
    m = Monitor(tmp_path, None, freeze_after=300, window=10)
    for i in range(299):
        m.monitor.observe(*pair(i % 2))
    m.monitor.evaluate()
    assert m.monitor.baseline is None
    for _ in range(5):
        m.monitor.observe(*pair(1.0))
    m.monitor.evaluate()
    baseline = m.monitor.baseline
    assert baseline is not None
    assert baseline.samples == 300


def test_freezing_a_baseline_holds_a_bounded_share_of_each_answers_values(
    tmp_path: Path,
) -> None:
    # A client chooses how many predictions an answer carries (a batch of 40,000
    # rows is 40,000 of them in well under a MiB). Every value of the first
    # freeze_after answers was kept until the baseline froze: 60 answers of 125,000
    # values took 300 MB, and sorting them held the event loop up for a second.
    m = Monitor(tmp_path, None, freeze_after=10, window=10, bins=10)
    for i in range(10):
        answer = orjson.dumps({"predictions": [float(i)] * 40_000})
        m.monitor.observe(b"", answer)
        m.monitor.evaluate()
        held = sum(len(values) for values in m.monitor._freezing.values())
        assert held <= 100_000  # per signal, whatever freeze_after
    baseline = m.monitor.baseline
    assert baseline is not None
    assert baseline.samples == 10
    # Every answer is in the baseline, in equal parts.
    assert baseline.histograms["prediction"].proportions == (0.1,) * 10 + (0.0,)


def test_a_digest_while_freezing_holds_one_answers_values_at_a_time(tmp_path: Path) -> None:
    """While a baseline was being frozen, a digest kept the values of every pending
    answer (up to the freeze share each) until all were parsed: up to 16 MiB of
    JSON as Python floats at once, a few hundred MB. Now the windows take each
    answer's values as it is read."""
    m = Monitor(tmp_path, None, freeze_after=10, window=10, max_pending_bytes="8MiB")
    answer = orjson.dumps({"predictions": [0.25] * 10_000})  # 10,000 values, 60 KB
    answers = 0
    while True:
        before = m.sample("sidecar_dropped_total", buffer="drift_pending") or 0
        m.monitor.observe(b"", answer)
        if (m.sample("sidecar_dropped_total", buffer="drift_pending") or 0) > before:
            break
        answers += 1
    assert answers >= 100
    tracemalloc.start()
    try:
        m.monitor.evaluate()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert m.monitor.baseline is not None
    # One answer parsed at a time, and 10 answers' share for the baseline (100,000
    # floats, about 4 MB); the whole digest held each answer's 10,000: 56 MB.
    assert peak < 16 * 1024 * 1024, peak


def test_a_baseline_is_frozen_into_a_directory_that_exists(tmp_path: Path) -> None:
    m = Monitor(tmp_path, None, freeze_after=10, window=10)
    m.path.parent.mkdir(parents=True)
    for i in range(10):
        m.monitor.observe(*pair(i % 2))
    m.monitor.evaluate()
    assert m.path.exists()


def test_after_each_evaluation_the_whole_budget_is_free_again(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, max_pending_bytes="40B", features=AGE)
    m.monitor.observe(b"x" * 10, b"y" * 10)
    m.monitor.evaluate()
    m.monitor.observe(b"x" * 20, b"y" * 21)
    assert (
        m.metrics.registry.get_sample_value(
            "sidecar_dropped_total", {"buffer": "drift_pending", "route": "infer"}
        )
        == 1.0
    )


def test_psi_is_computed_with_more_than_min_samples_too(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, min_samples=10)
    for i in range(20):
        m.monitor.observe(*pair(i % 2))
    assert m.monitor.evaluate() == {"prediction": pytest.approx(0.0)}


def test_a_feature_psi_is_exported_as_that_feature_whatever_its_name(tmp_path: Path) -> None:
    baseline = Baseline(
        {
            "prediction": BASELINE.histograms["prediction"],
            "score": Histogram("numeric", (30.0,), (0.5, 0.5), 0.0, 100.0),
        },
        100,
    )
    m = Monitor(tmp_path, baseline, window=10, features=[{"name": "score", "field": "s"}])
    for i in range(10):
        m.monitor.observe(*pair(i % 2, s=80))
    result = m.monitor.evaluate()
    assert m.sample("sidecar_prediction_psi") == pytest.approx(result["prediction"])
    assert m.sample("sidecar_feature_psi", feature="score") == pytest.approx(result["score"])
    assert result["score"] != pytest.approx(result["prediction"])


def digest_each(monitor: Monitor, pairs: list[tuple[bytes, bytes]]) -> dict[str, float]:
    for request, response in pairs:
        monitor.monitor.observe(request, response)
        monitor.monitor.evaluate()  # each pair parsed as it comes: nothing let go
    return monitor.monitor.evaluate()


def superseded(monitor: Monitor) -> float | None:
    labels = {"buffer": "drift_superseded", "route": "infer"}
    return monitor.metrics.registry.get_sample_value("sidecar_dropped_total", labels)


AGE = [{"name": "age", "field": "age"}]


def kept_and_every(tmp_path: Path, pairs: list[tuple[bytes, bytes]]) -> tuple[Monitor, Monitor]:
    """One monitor that observed ``pairs`` and one that digested each; their PSI (both
    signals) is checked equal, as letting unkept pairs go unparsed must keep it."""
    kept = Monitor(tmp_path, BASELINE, window=10, features=AGE)
    for request, response in pairs:
        kept.monitor.observe(request, response)
    every = Monitor(tmp_path / "every", BASELINE, window=10, features=AGE)
    assert kept.monitor.evaluate() == digest_each(every, pairs)
    assert set(kept.monitor.last_psi) == {"prediction", "age"}
    return kept, every


def test_only_the_pairs_the_windows_keep_are_parsed(tmp_path: Path) -> None:
    """Newest first, until every window is full: the older pairs are let go unparsed
    (and counted), and the PSI is what it would be had they been parsed."""
    pairs = [pair(float(n % 2), age=float(20 + n)) for n in range(35)]
    kept, every = kept_and_every(tmp_path, pairs)
    assert superseded(kept) == 25
    assert superseded(every) == 0


def test_pairs_without_a_signal_do_not_cut_its_window_short(tmp_path: Path) -> None:
    # The newest pairs lack the feature or are not JSON: older ones fill its window.
    with_age = [pair(float(n % 2), age=float(60 + n)) for n in range(10)]
    without = [pair(float(n % 2)) for n in range(10)] + [(b"{}", b"not json")] * 5
    kept = Monitor(tmp_path, BASELINE, window=10, features=AGE)
    for request, response in with_age + without:
        kept.monitor.observe(request, response)
    every = Monitor(tmp_path / "every", BASELINE, window=10, features=AGE)
    assert kept.monitor.evaluate() == digest_each(every, with_age + without)
    assert kept.monitor.last_psi["age"] > 0.2  # the drifting feature is still seen
    assert not superseded(kept)


def test_while_a_baseline_is_frozen_every_pair_is_parsed(tmp_path: Path) -> None:
    m = Monitor(tmp_path, None, window=10, freeze_after=30)
    for n in range(30):
        m.monitor.observe(*pair(float(n % 2), age=float(20 + n)))
    assert len(m.monitor._pending) == 30
    m.monitor.evaluate()
    assert m.monitor.baseline is not None
    assert m.monitor.baseline.samples == 30


async def test_a_running_monitor_parses_with_the_loops_other_work_in_between(
    tmp_path: Path,
) -> None:
    """Parsing happens on the event loop, a slice at a time: other tasks get turns
    while a second's pairs are parsed, and the PSI is the one parsing at once gives."""
    pairs = [pair(float(n % 2), age=float(20 + n % 50)) for n in range(3000)]
    sliced = Monitor(tmp_path, BASELINE, window=3000, features=AGE)
    at_once = Monitor(tmp_path / "at-once", BASELINE, window=3000, features=AGE)
    for request, response in pairs:
        sliced.monitor.observe(request, response)
        at_once.monitor.observe(request, response)
    turns = 0

    async def other_requests() -> None:
        nonlocal turns
        for _ in range(10_000_000):  # cancelled once the pairs are parsed
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_requests())
    await asyncio.sleep(0)
    before = turns
    await sliced.monitor._digest_in_slices(sliced.monitor._take_pending())
    during = turns - before
    ticker.cancel()
    # 3,000 pairs take milliseconds to parse: many slices of a tenth of one.
    assert during >= 5
    assert sliced.monitor._compute() == at_once.monitor.evaluate()
    assert set(sliced.monitor.last_psi) == {"prediction", "age"}


def test_an_answer_is_read_only_for_the_values_the_windows_keep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pair is parsed in one step on the event loop. An answer of 125,000
    # predictions (250 KB) took 80 ms to read value by value, where the window keeps
    # 1,000: 40 such answers held every request up for up to 380 ms.
    visited = 0
    real = predictions._numbers

    def counting(node: Any) -> Iterator[float]:
        nonlocal visited
        for value in real(node):
            visited += 1
            yield value

    monkeypatch.setattr(predictions, "_numbers", counting)
    m = Monitor(tmp_path, BASELINE, window=10)
    m.monitor.observe(b"", orjson.dumps({"predictions": [0.0, 1.0] * 100_000}))
    assert m.monitor.evaluate()["prediction"] == pytest.approx(0.0)
    assert visited <= 100


def test_an_answer_nested_as_deep_as_json_allows_is_read_not_fatal(tmp_path: Path) -> None:
    # The reader walked nested lists by recursion: an answer nested 1,000 deep (the
    # parser takes 1,024) raised RecursionError, which ended the route's drift task
    # for good while /health still said pass.
    m = Monitor(tmp_path, BASELINE, window=10)
    deep = b'{"predictions":' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}"
    m.monitor.observe(b"", deep)
    for i in range(9):
        m.monitor.observe(*pair(float(i % 2)))
    # Ten values, the deep answer's 1.0 among them: min_samples is met.
    assert m.monitor.evaluate()["prediction"] == pytest.approx(0.0)


def test_a_pair_too_large_to_parse_in_one_step_is_counted_not_kept(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, max_pair_bytes="64B", features=AGE)
    m.monitor.observe(b'{"age": 40}' + b" " * 21, b'{"label": 1}' + b" " * 20)  # 64 bytes
    m.monitor.observe(b'{"age": 40}' + b" " * 22, b'{"label": 1}' + b" " * 20)  # 65 bytes
    assert m.sample("sidecar_dropped_total", buffer="drift_too_large") == 1.0
    assert m.sample("sidecar_dropped_total", buffer="drift_pending") == 0.0
    assert m.monitor._pending_bytes == 64  # only the pair within the limit waits
    assert len(m.monitor._pending) == 1


def test_large_pairs_are_said_once_and_the_default_limit_is_a_mebibyte(tmp_path: Path) -> None:
    assert settings().max_pair_bytes == 1024 * 1024
    m = Monitor(tmp_path, BASELINE, max_pair_bytes="16B")
    with capture_logs() as logs:
        for _ in range(3):
            m.monitor.observe(b"", b'{"label": 1, "padding": 0}')
    warned = [line for line in logs if line["event"] == "drift_pair_too_large"]
    assert len(warned) == 1
    assert warned[0]["route"] == "infer"
    assert m.sample("sidecar_dropped_total", buffer="drift_too_large") == 3.0


async def test_a_digest_passes_the_loop_after_each_slice_of_parsing_not_after_each_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other requests get a turn every DIGEST_SLICE of parsing; a turn after every
    pair would make a busy second's digest as long as the loop's queue allows. The
    clock here moves 10 microseconds each time it is read, once a pair: a slice of
    100 microseconds is about ten pairs."""

    class Clock:
        now = 1000.0

        def perf_counter(self) -> float:
            self.now += 0.00001
            return self.now

    monkeypatch.setattr(drift, "time", Clock())
    m = Monitor(tmp_path, BASELINE, window=1000)
    for n in range(100):
        m.monitor.observe(*pair(float(n % 2)))
    turns = 0

    async def other_requests() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_requests())
    await asyncio.sleep(0)
    turns = 0
    await m.monitor._digest_in_slices(m.monitor._take_pending())
    ticker.cancel()
    assert 5 <= turns <= 20, turns  # about one every ten pairs, not one per pair
    assert m.monitor._compute() == {"prediction": pytest.approx(0.0)}


async def test_answers_are_taken_in_each_second_but_psi_waits_for_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """interval is how often PSI is computed (and drift said); answers are taken in
    more often. The first PSI comes an interval after the start: not at once, and
    not never (an interval of seconds, as configs have, not the tests' 10 ms)."""
    monkeypatch.setattr(drift, "DIGEST_EVERY", 0.01)
    m = Monitor(tmp_path, BASELINE, interval="2s", min_samples=10, features=AGE)
    for i in range(10):
        m.monitor.observe(*pair(i % 2))  # no age: counted as missing once taken in
    loop = asyncio.get_running_loop()
    started = loop.time()
    m.monitor.start()
    try:
        for _ in range(500):  # bounded: until the answers were taken in
            if m.quality("age", "missing") == 10:
                break
            await asyncio.sleep(0.01)
        assert m.quality("age", "missing") == 10
        await asyncio.sleep(0.05)  # a few more passes
        if loop.time() - started < 1.5:  # (a stalled machine may have reached it)
            assert m.monitor.last_psi == {}
            assert m.sample("sidecar_prediction_psi") is None
        for _ in range(1000):  # bounded: until the interval has passed
            if m.monitor.last_psi:
                break
            await asyncio.sleep(0.01)
        assert m.monitor.last_psi == {"prediction": pytest.approx(0.0)}
        assert loop.time() - started >= 2.0
    finally:
        await m.monitor.stop()


def test_answers_of_several_predictions_fill_the_window_and_the_rest_is_let_go(
    tmp_path: Path,
) -> None:
    """Answers of three predictions each, a window of ten and one feature value a
    pair: the prediction's window is full after four answers (one more value than
    it keeps), the feature's after ten; older pairs are let go, and the PSI is what
    parsing every pair gives."""
    pairs = [
        (orjson.dumps({"age": 20.0 + n}), orjson.dumps({"predictions": [0.0, 1.0, n % 2]}))
        for n in range(30)
    ]
    kept, _ = kept_and_every(tmp_path, pairs)
    assert superseded(kept) == 20  # the feature needed ten pairs


class Fatal(BaseException):
    """Not an Exception: nothing in the monitor catches it."""


async def test_why_a_monitor_stopped_is_said_once_it_has(tmp_path: Path) -> None:
    m = Monitor(tmp_path, BASELINE, interval="10ms")
    assert m.monitor.stopped is None  # never started
    m.monitor.start()
    await asyncio.sleep(0.02)
    assert m.monitor.stopped is None  # running
    await m.monitor.stop()
    assert m.monitor.stopped == "cancelled"

    ended = Monitor(tmp_path / "ended", BASELINE, interval="10ms")
    reason = "x" * 300
    ended.monitor._extractor = FailingOn(  # type: ignore[assignment]
        ended.monitor._extractor, 7.0, Fatal(reason)
    )
    ended.monitor.observe(*pair(7.0))
    with capture_logs():
        ended.monitor.start()
        try:
            for _ in range(500):  # bounded: until the task ended
                if ended.monitor.stopped is not None:
                    break
                await asyncio.sleep(0.01)
        finally:
            await ended.monitor.stop()
    assert ended.monitor.stopped == ("Fatal: " + reason)[:200]  # /health shows it whole


def test_the_error_of_an_unreadable_answer_is_cut_to_two_hundred_characters(
    tmp_path: Path,
) -> None:
    m = Monitor(tmp_path, BASELINE)
    m.monitor._extractor = FailingOn(  # type: ignore[assignment]
        m.monitor._extractor, 7.0, TypeError("y" * 300)
    )
    m.monitor.observe(*pair(7.0))
    with capture_logs():
        m.monitor.evaluate()
    assert m.monitor.last_error == ("TypeError: " + "y" * 300)[:200]


def test_the_error_of_a_baseline_not_written_is_cut_to_two_hundred_characters(
    tmp_path: Path,
) -> None:
    m = Monitor(tmp_path / ("d" * 200), None, freeze_after=10, window=10)
    (tmp_path / ("d" * 200)).mkdir()
    (tmp_path / ("d" * 200) / "state").write_text("a file where the baseline's folder would go")
    for i in range(10):
        m.monitor.observe(*pair(i % 2))
    with capture_logs():
        m.monitor.evaluate()
    error = m.monitor.last_error or ""
    assert error.startswith("baseline frozen but not written: ")
    assert len(error) == 200  # the message names the path: longer than that


def test_a_frozen_baseline_holds_each_answers_equal_share_of_100_000_values(
    tmp_path: Path,
) -> None:
    """The README's bound: at most 100,000 values a signal, an equal share of each of
    the first freeze_after answers (10,000 each of ten): the 10,000th value of an
    answer is in the baseline, the 10,001st is not."""
    m = Monitor(tmp_path, None, freeze_after=10, window=10, bins=10)
    answer = orjson.dumps({"predictions": [0.0] * 9_999 + [1.0] + [2.0] * 100})
    for _ in range(10):
        m.monitor.observe(b"", answer)
    m.monitor.evaluate()
    baseline = m.monitor.baseline
    assert baseline is not None
    histogram = baseline.histograms["prediction"]
    assert histogram.points == (0.0, 1.0)
    assert histogram.proportions == (0.9999, 0.0001, 0.0)
    # Eleven answers: 9,090 values each (99,990 in all), never one more.
    eleven = Monitor(tmp_path / "eleven", None, freeze_after=11, window=10, bins=10)
    answer = orjson.dumps({"predictions": [0.0] * 9_090 + [1.0]})
    for _ in range(11):
        eleven.monitor.observe(b"", answer)
    eleven.monitor.evaluate()
    assert eleven.monitor.baseline is not None
    assert eleven.monitor.baseline.histograms["prediction"].points == (0.0,)


def test_a_payload_line_that_is_not_a_pair_is_named_by_its_number() -> None:
    good = orjson.dumps({"route": "infer", "status": 200, "request": {}, "response": {}})
    cut = orjson.dumps({"route": "infer", "status": 200, "request": {}})
    with pytest.raises(ValueError, match=r"^payloads.jsonl line 3: not JSON"):
        list(payload_pairs([good, b"", b"{nope"], "infer", "payloads.jsonl"))
    with pytest.raises(ValueError, match=r"^line 2: not a JSON object$"):
        list(payload_pairs([good, b"[1]"], "infer"))
    with pytest.raises(ValueError, match=r"^payloads.jsonl line 2: no request or response$"):
        list(payload_pairs([good, cut], "infer", "payloads.jsonl"))
    with pytest.raises(ValueError, match=r"^line 1: no request or response$"):
        list(payload_pairs([cut], "infer"))


def test_the_window_keeps_the_latest_values_when_the_last_answer_read_overfills_it(
    tmp_path: Path,
) -> None:
    """Newest first, answers of three predictions fill a window of ten after four:
    the two values over are the oldest answer's, not the newest's."""
    pairs = [pair(0.0)] * 5 + [
        (b"", orjson.dumps({"predictions": values}))
        for values in ([1.0, 1.0, 1.0], [0.0] * 3, [0.0] * 3, [0.0] * 3)
    ]
    kept = Monitor(tmp_path, BASELINE, window=10)
    for request, response in pairs:
        kept.monitor.observe(request, response)
    every = Monitor(tmp_path / "every", BASELINE, window=10)
    expected = psi((0.5, 0.5, 0.0), (0.9, 0.1, 0.0))  # nine zeros, the oldest answer's last one
    assert kept.monitor.evaluate() == {"prediction": pytest.approx(expected)}
    assert digest_each(every, pairs) == {"prediction": pytest.approx(expected)}


def test_the_answers_a_baseline_was_frozen_from_are_the_first_window(tmp_path: Path) -> None:
    """Frozen from the first answers, the baseline is compared with them at once:
    PSI from the next evaluation, not only once a window of newer answers came."""
    m = Monitor(tmp_path, None, freeze_after=10, window=10, min_samples=10)
    for i in range(10):
        m.monitor.observe(*pair(i % 2))
    with capture_logs():
        assert m.monitor.evaluate() == {}  # frozen
    assert m.monitor.evaluate() == {"prediction": pytest.approx(0.0)}


async def test_a_pass_that_fails_is_logged_and_the_next_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = Monitor(tmp_path, BASELINE, interval="10ms", min_samples=10)
    compute = m.monitor._compute
    failures = [ZeroDivisionError("a pass no one foresaw" + "." * 300)]

    def failing_once() -> dict[str, float]:
        if failures:
            raise failures.pop()
        return compute()

    monkeypatch.setattr(m.monitor, "_compute", failing_once)
    for i in range(10):
        m.monitor.observe(*pair(i % 2))
    with capture_logs() as logs:
        m.monitor.start()
        try:
            for _ in range(500):  # bounded: until a pass after the failed one computed
                if m.monitor.last_psi:
                    break
                await asyncio.sleep(0.01)
            assert m.monitor.last_psi == {"prediction": pytest.approx(0.0)}
            assert m.monitor.stopped is None
        finally:
            await m.monitor.stop()
    # Cut, as /health shows it.
    assert m.monitor.last_error == ("ZeroDivisionError: a pass no one foresaw" + "." * 300)[:200]
    assert "drift_evaluation_failed" in [e["event"] for e in logs]


async def test_a_monitor_with_a_long_interval_wakes_each_second_not_continuously(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers are taken in each second whatever the interval (the pending ones stay
    few), and the monitor sleeps in between: it does not spin on the event loop.
    Checked by what it asks to sleep, not by wall-clock bounds."""
    m = Monitor(tmp_path, BASELINE, interval="60s")
    take = m.monitor._take_pending
    loop = asyncio.get_running_loop()
    passes: list[float] = []
    first_pass = asyncio.Event()
    slept: list[float] = []  # the test itself waits on events only
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float) -> None:
        slept.append(delay)
        await real_sleep(delay)

    def counted() -> Any:
        passes.append(loop.time())
        first_pass.set()
        return take()

    monkeypatch.setattr(m.monitor, "_take_pending", counted)
    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    started = loop.time()
    m.monitor.start()
    try:
        await asyncio.wait_for(first_pass.wait(), 5)
    finally:
        await m.monitor.stop()
    assert len(passes) == 1
    assert slept[0] == 1.0  # one second, not the 60 s interval, and not a spin
    assert passes[0] - started >= 1.0


def test_after_a_freeze_that_failed_the_next_freeze_after_answers_make_the_baseline(
    tmp_path: Path,
) -> None:
    m = Monitor(tmp_path, None, freeze_after=10, window=10, bins=3)
    for _ in range(10):
        m.monitor.observe(b"", orjson.dumps({"other": 1}))
    with capture_logs():
        m.monitor.evaluate()  # no predictions: not frozen, started over
    for i in range(9):
        m.monitor.observe(*pair(i % 2))
    m.monitor.evaluate()
    assert m.monitor.baseline is None  # nine answers are not ten
    m.monitor.observe(*pair(1.0))
    m.monitor.observe(*pair(0.0))  # the eleventh: not part of it
    with capture_logs():
        m.monitor.evaluate()
    assert m.monitor.baseline is not None
    assert m.monitor.baseline.samples == 10
    assert m.monitor.baseline.histograms["prediction"].proportions == (0.5, 0.5, 0.0)
