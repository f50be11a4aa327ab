"""Prediction and feature distributions: histograms, PSI, and the baseline file a
route's drift is measured against (read once, when a config is compiled)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

_EPSILON = 1e-4  # floor for empty bins, so ln() stays finite


@dataclass(frozen=True, slots=True)
class Histogram:
    """Bins of one signal. Few distinct values: one bin each; else quantile bins."""

    kind: Literal["categorical", "numeric"]
    points: tuple[float, ...]  # categorical: the values; numeric: inner edges
    proportions: tuple[float, ...]
    low: float | None = None  # the smallest and largest value the baseline saw
    high: float | None = None

    def contains(self, value: float) -> bool:
        """Within what the baseline saw (a value, or the range of values)."""
        if self.kind == "categorical":
            return value in self.points
        return self.low is None or self.high is None or self.low <= value <= self.high

    @classmethod
    def from_samples(cls, samples: Sequence[float], bins: int) -> Histogram:
        if not samples:
            raise ValueError("no samples to build a histogram from")
        distinct = sorted(set(samples))
        if len(distinct) <= bins:
            # One bin per value, plus a last bin for values the baseline never saw.
            counts = [0] * (len(distinct) + 1)
            index = {v: i for i, v in enumerate(distinct)}
            for value in samples:
                counts[index[value]] += 1
            return cls(
                "categorical", tuple(distinct), _normalise(counts), distinct[0], distinct[-1]
            )
        ordered = sorted(samples)
        edges = sorted({ordered[int(len(ordered) * q / bins)] for q in range(1, bins)})
        histogram = cls("numeric", tuple(edges), ())
        return cls(
            "numeric",
            tuple(edges),
            histogram.proportions_of(samples),
            ordered[0],
            ordered[-1],
        )

    def proportions_of(self, samples: Iterable[float]) -> tuple[float, ...]:
        if self.kind == "categorical":
            index = {v: i for i, v in enumerate(self.points)}
            counts = [0] * (len(self.points) + 1)
            for value in samples:
                counts[index.get(value, len(self.points))] += 1
        else:
            counts = [0] * (len(self.points) + 1)
            for value in samples:
                counts[bisect.bisect_right(self.points, value)] += 1
        return _normalise(counts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "points": list(self.points),
            "proportions": list(self.proportions),
        }
        if self.low is not None and self.high is not None:
            out["range"] = [self.low, self.high]
        return out

    @classmethod
    def from_json(cls, data: Any) -> Histogram:
        kind = data["kind"]
        if kind not in ("categorical", "numeric"):
            raise ValueError(f"unknown histogram kind {kind!r}")
        points = tuple(float(p) for p in data["points"])
        proportions = tuple(float(p) for p in data["proportions"])
        if len(proportions) != len(points) + 1:
            raise ValueError("a histogram needs one proportion more than its points")
        low, high = (float(v) for v in data["range"]) if "range" in data else (None, None)
        return cls(kind, points, proportions, low, high)


def _normalise(counts: Sequence[int]) -> tuple[float, ...]:
    total = sum(counts)
    return tuple(c / total if total else 0.0 for c in counts)


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, _EPSILON), max(a, _EPSILON)
        total += (a - e) * math.log(a / e)
    return total


@dataclass(frozen=True, slots=True)
class Baseline:
    histograms: dict[str, Histogram]  # "prediction" and one per feature
    samples: int

    def to_json(self, route: str) -> bytes:
        return orjson.dumps(
            {
                "version": 1,
                "route": route,
                "created": datetime.now(UTC).isoformat(),
                "samples": self.samples,
                "histograms": {k: h.to_json() for k, h in self.histograms.items()},
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def load(cls, path: Path) -> Baseline:
        data = orjson.loads(path.read_bytes())
        return cls(
            {k: Histogram.from_json(v) for k, v in data["histograms"].items()}, int(data["samples"])
        )
